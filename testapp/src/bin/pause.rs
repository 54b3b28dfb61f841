//! The sandbox ("pause") container: holds the Pod's namespaces, sleeps until told to stop.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

fn main() {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("pause: signal handler: {e}");
            std::process::exit(1);
        }
    }
    while !stop.load(Ordering::Relaxed) {
        #[allow(clippy::disallowed_methods)] // a plain synchronous program
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

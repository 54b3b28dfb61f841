//! `podmig-runc` as a process, over a stand-in runc script that records how it was called:
//! pass-through must be exact, and the commands the wrapper handles must behave.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

const WRAPPER: &str = env!("CARGO_BIN_EXE_podmig-runc");

/// A fake runc: appends its arguments (one per line) and stdin to `calls`, prints
/// `stdout`/`stderr` and exits with `code`.
fn fake_runc(dir: &Path, code: i32, stdout: &str, stderr: &str) -> PathBuf {
    let path = dir.join("runc");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\" >> {calls}; done\necho --- >> {calls}\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {code}\n",
            calls = dir.join("calls").display()
        ),
    )
    .expect("write fake runc");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn wrapper(dir: &Path, runc: &Path, args: &[&str]) -> std::process::Output {
    Command::new(WRAPPER)
        .args(args)
        .env("PODMIG_RUNC_BINARY", runc)
        .env("PODMIG_HOOK_SOCKET", dir.join("no-daemon.sock"))
        .output()
        .expect("run podmig-runc")
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn other_commands_pass_through_with_arguments_output_and_exit_code() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let runc = fake_runc(tmp.path(), 3, "{\"id\":\"c1\"}", "warn");
    let args = [
        "--root",
        "/r",
        "--log",
        "/l.json",
        "--log-format",
        "json",
        "state",
        "c1",
    ];
    let out = wrapper(tmp.path(), &runc, &args);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"id\":\"c1\"}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "warn");
    let mut expected: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    expected.push("---".into());
    assert_eq!(calls(tmp.path()), expected);
}

#[test]
fn create_of_a_plain_bundle_passes_through_without_a_daemon() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir(&bundle).expect("mkdir");
    std::fs::write(
        bundle.join("config.json"),
        r#"{"annotations":{"io.kubernetes.cri.container-type":"container"}}"#,
    )
    .expect("write");
    let runc = fake_runc(tmp.path(), 0, "", "");
    let b = bundle.display().to_string();
    let out = wrapper(tmp.path(), &runc, &["create", "--bundle", &b, "c1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        calls(tmp.path()),
        vec!["create", "--bundle", &b, "c1", "---"]
    );
}

#[test]
fn create_of_a_migration_target_without_a_daemon_fails_with_a_reason_in_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir(&bundle).expect("mkdir");
    std::fs::write(
        bundle.join("config.json"),
        r#"{"annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.container-name":"app","podmig.dev/migrate-from":"uid-a"}}"#,
    )
    .expect("write");
    let runc = fake_runc(tmp.path(), 0, "", "");
    let log = tmp.path().join("log.json");
    let (b, l) = (bundle.display().to_string(), log.display().to_string());
    let out = wrapper(
        tmp.path(),
        &runc,
        &[
            "--log",
            &l,
            "--log-format",
            "json",
            "create",
            "--bundle",
            &b,
            "c1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(calls(tmp.path()).is_empty(), "runc must not be called");
    let line = std::fs::read_to_string(&log).expect("log written");
    let entry: serde_json::Value = serde_json::from_str(line.trim()).expect("json log line");
    assert_eq!(entry["level"], "error");
    assert!(
        entry["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("refusing to start it fresh"),
        "{line}"
    );
}

#[test]
fn delete_of_a_gone_container_succeeds_and_other_failures_do_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let runc = fake_runc(tmp.path(), 1, "", "container does not exist");
    let out = wrapper(tmp.path(), &runc, &["delete", "--force", "c1"]);
    assert!(out.status.success(), "{out:?}");
    let runc = fake_runc(tmp.path(), 1, "", "permission denied");
    let out = wrapper(tmp.path(), &runc, &["delete", "c1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "permission denied");
}

#[test]
fn start_after_a_restore_is_a_no_op() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let marker = podmig_cri_ext::wrapper::restored_marker(&root, "c1");
    std::fs::create_dir_all(marker.parent().expect("parent")).expect("mkdir");
    std::fs::write(&marker, b"").expect("marker");
    let runc = fake_runc(tmp.path(), 7, "", "");
    let r = root.display().to_string();
    let out = wrapper(tmp.path(), &runc, &["--root", &r, "start", "c1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(calls(tmp.path()).is_empty());
    assert!(!marker.exists(), "the marker is consumed");
    // A second start is runc's again.
    let out = wrapper(tmp.path(), &runc, &["--root", &r, "start", "c1"]);
    assert_eq!(out.status.code(), Some(7));
}

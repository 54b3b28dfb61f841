//! Compiles the vendored protos (protoc from Debian's protobuf-compiler, installed by setup).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/podmig/hook/v1/hook.proto",
        "proto/podmig/runtime/v1/checkpoint.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

//! Compiles every `.proto` under `proto/` with protox (a pure-Rust protobuf compiler), so no system
//! `protoc` is needed, then generates tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/engine.proto",
        "proto/cluster.proto",
        "proto/csi.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

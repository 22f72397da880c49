//! Compiles `proto/grpc_predict_v2.proto` (the Open Inference Protocol's gRPC service) with
//! protox (pure Rust: no `protoc` binary) and tonic's prost generator (the server, and the
//! client the benchmarks load it with), and
//! writes its descriptor set for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/grpc_predict_v2.proto");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], [include])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("grpc_predict_v2.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

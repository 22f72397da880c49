//! Compiles `proto/onnx.proto` with protox (pure Rust: no `protoc` binary needed) and prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/onnx.proto");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], [include])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}

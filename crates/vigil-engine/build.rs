//! Generates the Open Inference Protocol client from `proto/inference.proto` (needs `protoc`,
//! Debian's `protobuf-compiler`; `make setup` installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/inference.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_protos(&["proto/inference.proto"], &["proto"])?;
    Ok(())
}

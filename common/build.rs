//! Generates the gRPC code from `proto/lockstep/v1/lockstep.proto` with a vendored protoc,
//! so a fresh machine needs nothing but the Rust toolchain.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not compile time: a build script binary reused from another checkout of the same source
    // (a shared target directory) must still find this checkout's proto.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("..")
        .join("proto");
    let proto = root.join("lockstep/v1/lockstep.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("lockstep_descriptor.bin"))
        .compile_with_config(config, &[proto], &[root])?;
    Ok(())
}

//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and generates the tonic clients and servers from the
//! resulting descriptor set. The same set, with source comments, is written to
//! `OUT_DIR/bfb_descriptor.bin` for server reflection, so `grpcurl describe`
//! shows the proto comments.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    collect_protos("proto".into(), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(&files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("bfb_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        // google.rpc.Status is tonic-types' type, so per-item errors carry
        // the same details as a call's status.
        .extern_path(".google.rpc", "::tonic_types::pb")
        // prost with a small encode buffer (src/pb.rs says why).
        .codec_path("crate::pb::LeanCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

fn collect_protos(dir: PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

//! Consumers in other languages: Python stubs generated from `proto/` with
//! grpcio-tools call GetCustomer, BatchGetCustomers (v1 and v2) and
//! StreamUserActivity with a deadline and metadata, and check the results
//! (`tests/interop/client.py`). `make test` installs grpcio and
//! grpcio-tools in `.tools/venv`.

mod common;

use std::path::{Path, PathBuf};

use bfb::sim::SimConfig;

/// The venv's Python (PATH from `make test` puts `.tools/venv/bin` first).
fn python() -> String {
    std::env::var("BFB_PYTHON").unwrap_or_else(|_| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/python");
        if venv.exists() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    })
}

/// Every .proto under `dir`.
fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            protos(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn python_grpcio_stubs_call_every_public_rpc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = std::env::temp_dir().join(format!("bfb-py-stubs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stubs);
    std::fs::create_dir_all(&stubs).expect("stubs dir");
    let mut files = Vec::new();
    protos(&root.join("proto"), &mut files);
    let out = tokio::process::Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-Iproto"])
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .args(
            files
                .iter()
                .map(|f| f.strip_prefix(root).expect("under root")),
        )
        .current_dir(root)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run python (make test installs it): {e}"));
    assert!(
        out.status.success(),
        "grpc_tools.protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let h = common::start(SimConfig::default(), |_| {}).await;
    let out = tokio::process::Command::new(python())
        .arg(root.join("tests/interop/client.py"))
        .arg(&stubs)
        .arg(h.bfb.to_string())
        .output()
        .await
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("done\n"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("ok ").count(), 15, "{stdout}");
    // The metadata reached bfb: its request id went downstream.
    let seen = h.service_stats("calls").await.last_metadata;
    assert_eq!(
        seen.get("x-request-id").map(String::as_str),
        Some("python-interop-1")
    );
    let _ = std::fs::remove_dir_all(&stubs);
}

//! Python gRPC clients (grpcio, installed in `.tools/venv` by `make test`):
//! the venv's interpreter and stubs generated from `proto/`.

use std::path::{Path, PathBuf};

/// The venv's Python (PATH from `make test` puts `.tools/venv/bin` first).
pub fn python() -> String {
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

/// Python stubs of every contract, generated with grpcio-tools into a
/// fresh directory named after `name`.
pub async fn stubs(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = std::env::temp_dir().join(format!("bfb-py-{name}-{}", std::process::id()));
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
    stubs
}

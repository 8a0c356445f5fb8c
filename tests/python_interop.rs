//! Consumers in other languages: Python stubs generated from `proto/` with
//! grpcio-tools call GetCustomer, BatchGetCustomers (v1 and v2) and
//! StreamUserActivity with a deadline and metadata, and check the results
//! (`tests/interop/client.py`). `make test` installs grpcio and
//! grpcio-tools in `.tools/venv`.

mod common;

use std::path::Path;

use bfb::sim::SimConfig;

#[tokio::test]
async fn python_grpcio_stubs_call_every_public_rpc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = common::python::stubs("interop").await;

    let h = common::start(SimConfig::default(), |_| {}).await;
    let out = tokio::process::Command::new(common::python::python())
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

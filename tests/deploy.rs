//! The container and Kubernetes manifests agree with bfb: every manifest
//! parses, the ConfigMap holds a valid config, probes hit the gRPC port and
//! the health service names bfb serves, the grace period covers the drain,
//! and selectors and references line up.

use std::time::Duration;

use bfb::{config::Config, server::READINESS};
use serde_norway::Value;

fn manifest(name: &str) -> Value {
    let path = format!("deploy/kubernetes/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn port(addr: std::net::SocketAddr) -> u64 {
    u64::from(addr.port())
}

#[test]
fn manifests_agree_with_the_config_and_the_server() {
    let cm = manifest("configmap.yaml");
    let deploy = manifest("deployment.yaml");
    let service = manifest("service.yaml");
    let pdb = manifest("pdb.yaml");
    let hpa = manifest("hpa.yaml");
    for (v, kind) in [
        (&cm, "ConfigMap"),
        (&deploy, "Deployment"),
        (&service, "Service"),
        (&pdb, "PodDisruptionBudget"),
        (&hpa, "HorizontalPodAutoscaler"),
    ] {
        assert_eq!(v["kind"].as_str(), Some(kind));
    }

    let toml = cm["data"]["bfb.toml"]
        .as_str()
        .expect("bfb.toml in the ConfigMap");
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("ConfigMap config: {e}"));
    let metrics = config
        .telemetry
        .metrics_listen
        .expect("metrics endpoint on");

    let pod = at(&deploy, "spec.template.spec");
    let container = at(pod, "containers.0");
    let ports = container["ports"].as_sequence().expect("ports");
    let named = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("port {name}"))
    };
    assert_eq!(named("grpc"), port(config.listen));
    assert_eq!(named("metrics"), port(metrics));
    assert!(
        config.listen.ip().is_unspecified(),
        "listen on all interfaces in a pod"
    );

    // Probes: native gRPC on the plaintext health port (the gRPC port
    // needs client certificates), the service names bfb serves.
    let tls = config.tls.as_ref().expect("TLS on in production");
    let health = config
        .server
        .health_listen
        .expect("a plaintext health port");
    assert_eq!(named("health"), port(health));
    assert_eq!(
        at(container, "livenessProbe.grpc.port").as_u64(),
        Some(port(health))
    );
    assert_eq!(
        at(container, "livenessProbe.grpc.service").as_str(),
        Some("")
    );
    assert_eq!(
        at(container, "readinessProbe.grpc.port").as_u64(),
        Some(port(health))
    );
    assert_ne!(config.auth.mode, bfb::config::AuthMode::None);
    // The TLS files are where the secret is mounted.
    let tls_mount = at(container, "volumeMounts.1.mountPath")
        .as_str()
        .expect("tls mount");
    for file in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()] {
        let file = file.expect("file").to_str().expect("utf-8");
        assert!(file.starts_with(tls_mount), "{file} under {tls_mount}");
    }
    assert!(at(pod, "volumes.1.secret.secretName").is_string());
    assert_eq!(
        at(container, "readinessProbe.grpc.service").as_str(),
        Some(READINESS)
    );

    // The grace period covers the drain and the in-flight grace.
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace"),
    );
    assert!(
        grace > config.server.drain_delay + config.server.shutdown_grace,
        "{grace:?}"
    );

    // Resources, non-root, the config mounted where the args point.
    assert!(at(container, "resources.requests.cpu").is_string());
    assert!(at(container, "resources.limits.memory").is_string());
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["serve", "--config", "/etc/bfb/bfb.toml"]);
    assert_eq!(
        at(container, "volumeMounts.0.mountPath").as_str(),
        Some("/etc/bfb")
    );
    assert_eq!(at(pod, "volumes.0.configMap.name"), &cm["metadata"]["name"]);

    // Selectors and references line up.
    let labels = at(&deploy, "spec.template.metadata.labels");
    assert_eq!(at(&deploy, "spec.selector.matchLabels"), labels);
    assert_eq!(at(&service, "spec.selector"), labels);
    assert_eq!(at(&pdb, "spec.selector.matchLabels"), labels);
    assert_eq!(
        at(&hpa, "spec.scaleTargetRef.name"),
        at(&deploy, "metadata.name")
    );
    for p in service["spec"]["ports"]
        .as_sequence()
        .expect("service ports")
    {
        let target = p["targetPort"].as_str().expect("named targetPort");
        assert!(
            ports.iter().any(|c| c["name"].as_str() == Some(target)),
            "{target}"
        );
    }
}

#[test]
fn the_fleet_spreads_scales_on_load_and_keeps_two_serving() {
    let deploy = manifest("deployment.yaml");
    let spread = at(&deploy, "spec.template.spec.topologySpreadConstraints")
        .as_sequence()
        .expect("topology spread");
    let keys: Vec<&str> = spread
        .iter()
        .filter_map(|c| c["topologyKey"].as_str())
        .collect();
    assert!(keys.contains(&"topology.kubernetes.io/zone"), "{keys:?}");
    assert!(keys.contains(&"kubernetes.io/hostname"), "{keys:?}");
    let labels = at(&deploy, "spec.template.metadata.labels");
    for c in spread {
        assert_eq!(&c["labelSelector"]["matchLabels"], labels);
    }
    let pdb = manifest("pdb.yaml");
    let hpa = manifest("hpa.yaml");
    let min = at(&hpa, "spec.minReplicas").as_u64().expect("minReplicas");
    let unavailable = at(&pdb, "spec.maxUnavailable").as_u64().expect("a count");
    assert!(unavailable < min, "the PDB must leave replicas serving");
    assert!(min >= 3, "a fleet: at least three replicas");
    // The HPA's load metric is one bfb exports, and the adapter rule serves it.
    let metrics = at(&hpa, "spec.metrics").as_sequence().expect("metrics");
    let pods: Vec<&str> = metrics
        .iter()
        .filter_map(|m| m["pods"]["metric"]["name"].as_str())
        .collect();
    assert_eq!(pods, ["bfb_rpcs_in_flight"]);
    let rules = manifest("prometheus-adapter-rules.yaml");
    assert_eq!(
        at(&rules, "rules.0.name.as").as_str(),
        Some("bfb_rpcs_in_flight")
    );
    let exported = bfb::telemetry::metrics::Metrics::new().encode();
    assert!(
        exported.contains("# TYPE bfb_rpcs_in_flight gauge"),
        "{exported}"
    );
    // The shared tier follows a Sentinel-managed Redis.
    let cm = manifest("configmap.yaml");
    let config = Config::parse(cm["data"]["bfb.toml"].as_str().expect("toml")).expect("config");
    assert!(config.cache.enabled);
    assert!(matches!(
        config.cache.redis(),
        Some(bfb::config::RedisTopology::Sentinel(_))
    ));
}

#[test]
fn the_downstream_example_is_a_headless_service_the_config_resolves() {
    let svc = manifest("downstream-headless-service.yaml");
    assert_eq!(svc["kind"].as_str(), Some("Service"));
    assert_eq!(
        at(&svc, "spec.clusterIP").as_str(),
        Some("None"),
        "headless: the name must resolve to every pod"
    );
    let name = at(&svc, "metadata.name").as_str().expect("name");
    let namespace = at(&svc, "metadata.namespace").as_str().expect("namespace");
    let port = at(&svc, "spec.ports.0.port").as_u64().expect("port");
    assert_eq!(at(&svc, "spec.ports.0.name").as_str(), Some("grpc"));
    let cm = manifest("configmap.yaml");
    let config = Config::parse(cm["data"]["bfb.toml"].as_str().expect("toml")).expect("config");
    let orders = config
        .downstream(bfb::component::Component::Orders)
        .expect("orders");
    assert_eq!(
        orders.endpoint,
        format!("http://{name}.{namespace}.svc.cluster.local:{port}")
    );
}

#[test]
fn the_service_monitor_scrapes_the_services_metrics_port() {
    let monitor = manifest("servicemonitor.yaml");
    let service = manifest("service.yaml");
    assert_eq!(monitor["kind"].as_str(), Some("ServiceMonitor"));
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(
        at(&monitor, "spec.selector.matchLabels"),
        &service["metadata"]["labels"],
        "selects the Service by its labels"
    );
    let endpoint = at(&monitor, "spec.endpoints.0");
    let port = endpoint["port"].as_str().expect("a named port");
    let ports = service["spec"]["ports"].as_sequence().expect("ports");
    assert!(
        ports.iter().any(|p| p["name"].as_str() == Some(port)),
        "the Service has a port named {port}"
    );
    assert_eq!(port, "metrics");
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
}

#[test]
fn dockerfile_builds_the_release_binary_as_make_release_does_and_runs_as_non_root() {
    let docker = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    let make = std::fs::read_to_string("Makefile").expect("Makefile");
    let build = "cargo build --release --locked --bin bfb";
    assert!(docker.contains(&format!("RUN {build}")));
    assert!(
        make.contains(&format!("\t{build}")),
        "make release uses the same command"
    );
    assert!(docker.matches("\nFROM ").count() >= 2, "multi-stage");
    assert!(docker.contains("\nUSER nonroot"));
    assert!(docker.contains("COPY --from=build /src/target/release/bfb /usr/local/bin/bfb"));
    assert!(docker.contains(r#"CMD ["serve", "--config", "/etc/bfb/bfb.toml"]"#));
    // The config the image ships is valid.
    Config::parse(bfb::config::EXAMPLE).expect("example config");
}

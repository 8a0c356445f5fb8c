//! The `bfb` command: `serve`, `check-config`, `sim` and `demo`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use bfb::{
    component::Component,
    config::{Config, ConfigError, TelemetrySettings},
    server::Listeners,
    sim::{self, SimConfig, data::Dataset, state::Behavior},
    telemetry,
};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

/// mimalloc instead of glibc's malloc: an RPC allocates and frees a few
/// hundred small objects across tasks and threads (docs/performance.md has
/// both measured; `--no-default-features` builds with the system's).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints a line to stdout, ignoring errors: a closed pipe (a supervisor that
/// stopped reading) must not crash bfb, which `println!` would.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    version,
    about = "bfb: one gRPC call for a complete, versioned domain aggregate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run bfb with a TOML config.
    Serve {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file and print every problem.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Run the simulated downstream services.
    Sim(SimArgs),
    /// Run the simulated services and bfb in one process on the default config.
    Demo {
        /// bfb's address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// The simulated services' address.
        #[arg(long, default_value = "127.0.0.1:50061")]
        sim_listen: SocketAddr,
        /// The admin API's address (skipped if taken).
        #[arg(long, default_value = "127.0.0.1:50052")]
        admin_listen: SocketAddr,
        /// Latency of every simulated call, e.g. 20ms.
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        sim_latency: Duration,
        /// Replicas of the simulated services (on consecutive ports), to
        /// watch bfb balance over them and eject a failing one.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        replicas: u16,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// `all`, or a comma-separated list of: profile, favorites, reviews,
    /// orders, calls, emails, sms, directory.
    #[arg(long, default_value = "all", value_parser = parse_services)]
    services: ServiceList,
    /// Number of customers (c-1..c-N).
    #[arg(long, default_value_t = 10_000)]
    customers: u64,
    /// Number of users (u-1..u-N).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Latency of every call.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Fraction of calls that take --slow-extra longer.
    #[arg(long, default_value_t = 0.0)]
    slow_fraction: f64,
    /// Extra latency of slow calls.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    slow_extra: Duration,
    /// Fraction of calls that fail.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// gRPC code of injected failures, by number (14 = UNAVAILABLE).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(i32).range(1..=16))]
    error_code: i32,
}

/// The `--services` list (a newtype: clap reads a bare `Vec` as repeated flags).
#[derive(Clone)]
struct ServiceList(Vec<Component>);

fn parse_services(s: &str) -> Result<ServiceList, String> {
    if s == "all" {
        return Ok(ServiceList(Component::ALL.to_vec()));
    }
    s.split(',')
        .map(|name| {
            Component::from_name(name.trim()).ok_or_else(|| {
                format!(
                    "unknown service {name:?}; expected all or any of: {}",
                    bfb::component::names(&Component::ALL)
                )
            })
        })
        .collect::<Result<_, _>>()
        .map(ServiceList)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bfb: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds the listener of config key `key`; an error names the key and the
/// address (`telemetry.metrics_listen 127.0.0.1:9464: address already in use`).
async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "address already in use".to_string(),
            std::io::ErrorKind::AddrNotAvailable => "no such address on this host".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => e.to_string(),
        };
        format!("{key} {addr}: {why}")
    })
}

async fn bind_some(key: &str, addr: Option<SocketAddr>) -> Result<Option<TcpListener>, String> {
    match addr {
        Some(addr) => bind(key, addr).await.map(Some),
        None => Ok(None),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                say!("{}: OK", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(ConfigError::Invalid(problems)) => {
                say!("{}: {} problem(s)", file.display(), problems.len());
                for p in problems {
                    say!("  - {p}");
                }
                Ok(ExitCode::FAILURE)
            }
            Err(e) => {
                say!("{}: {e}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let telemetry = telemetry::init(&config.telemetry)?;
            let grpc = bind("listen", config.listen).await?;
            let metrics =
                bind_some("telemetry.metrics_listen", config.telemetry.metrics_listen).await?;
            let admin = bind_some("admin_listen", config.admin_listen).await?;
            let health = bind_some("server.health_listen", config.server.health_listen).await?;
            // Scripts and benches start bfb on port 0 and read the addresses from here.
            say!("bfb listening on {}", grpc.local_addr()?);
            if let Some(m) = &metrics {
                say!("bfb metrics on {}", m.local_addr()?);
            }
            if let Some(a) = &admin {
                say!("bfb admin on {}", a.local_addr()?);
            }
            if let Some(h) = &health {
                say!("bfb health on {}", h.local_addr()?);
            }
            let result = bfb::server::serve(
                &config,
                Listeners {
                    grpc,
                    metrics,
                    admin,
                    health,
                },
                shutdown_signal(),
            )
            .await;
            // Flush spans whatever happened.
            telemetry.shutdown();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim(args) => {
            let _telemetry = telemetry::init(&TelemetrySettings::default())?;
            for (name, v) in [
                ("--slow-fraction", args.slow_fraction),
                ("--error-rate", args.error_rate),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(format!("{name} must be between 0 and 1").into());
                }
            }
            let config = SimConfig {
                services: args.services.0,
                data: Dataset {
                    customers: args.customers,
                    users: args.users,
                },
                behavior: Behavior {
                    latency: args.latency,
                    slow_fraction: args.slow_fraction,
                    slow_extra: args.slow_extra,
                    error_rate: args.error_rate,
                    error_code: tonic::Code::from_i32(args.error_code),
                    retry_pushback_ms: None,
                },
                tls: None,
            };
            let listener = TcpListener::bind(args.listen).await?;
            // Tests start the sim on port 0 and read the address from here.
            say!("bfb sim listening on {}", listener.local_addr()?);
            sim::serve(config, listener, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            listen,
            sim_listen,
            admin_listen,
            sim_latency,
            replicas,
        } => {
            let _telemetry = telemetry::init(&TelemetrySettings::default())?;
            let addrs = bfb::demo::Addrs {
                bfb: listen,
                sim: sim_listen,
                admin: admin_listen,
                replicas,
            };
            bfb::demo::run(addrs, sim_latency, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

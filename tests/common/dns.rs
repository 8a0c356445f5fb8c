//! A real DNS server for discovery tests: dnsmasq (installed by
//! scripts/install-test-tools.sh) on a free loopback port, answering for
//! `*.test` from a hosts file it re-reads on SIGHUP, and SRV records given
//! at start. Authoritative for `test`: a name missing from the file is
//! NXDOMAIN.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Dns {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// A free port on 127.0.0.1 for both UDP and TCP (nothing holds it after).
pub fn free_port(ip: &str) -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind(format!("{ip}:0")).expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(format!("{ip}:{port}")).is_ok() {
            return port;
        }
    }
}

fn dnsmasq() -> String {
    ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("dnsmasq")
        .to_string()
}

impl Dns {
    /// dnsmasq with `hosts` (`ip name` pairs) and `srv` records (`name`,
    /// `target`, `port`).
    pub async fn start(hosts: &[(&str, &str)], srv: &[(&str, &str, u16)]) -> Dns {
        let dir = std::env::temp_dir().join(format!(
            "bfb-dns-{}-{}",
            std::process::id(),
            free_port("127.0.0.1")
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let port = free_port("127.0.0.1");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(dnsmasq());
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local=/test/",
            "--local-ttl=0",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", dir.join("hosts").display()))
        .arg(format!("--pid-file={}", dir.join("pid").display()));
        // As root dnsmasq would switch to `nobody`; stay, to read the file.
        if is_root() {
            cmd.arg("--user=root");
        }
        for (name, target, port) in srv {
            cmd.arg(format!("--srv-host={name},{target},{port}"));
        }
        write_hosts(&dir, hosts);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq: run scripts/install-test-tools.sh");
        let dns = Dns { child, addr, dir };
        // Ready once it accepts TCP on its port (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "dnsmasq did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        dns
    }

    /// Replaces the hosts file and tells dnsmasq to re-read it.
    pub fn set_hosts(&self, hosts: &[(&str, &str)]) {
        write_hosts(&self.dir, hosts);
        super::signal(self.child.id(), "HUP");
    }

    /// Stops the server (its port then refuses and times out queries).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_hosts(dir: &std::path::Path, hosts: &[(&str, &str)]) {
    let text: String = hosts.iter().map(|(ip, n)| format!("{ip} {n}\n")).collect();
    let tmp = dir.join("hosts.tmp");
    std::fs::write(&tmp, text).expect("write hosts");
    std::fs::rename(&tmp, dir.join("hosts")).expect("rename hosts");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A throwaway RabbitMQ node for the tests that must restart the broker or give it a TLS
//! listener, which the shared broker on 5672 (used by every other test at the same time) must
//! never be. And the test certificates for it, made here with rcgen.
//!
//! Each node has its own name (`csa-<pid>-<n>@localhost`), AMQP and Erlang distribution ports,
//! Erlang cookie (its `HOME` is its directory) and directory for the database, logs, config file
//! and an empty plugin list (the management plugin would try to bind 15672, which the shared
//! broker holds). It registers with the machine's `epmd`, as every node does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

/// The node's user and password (its default user, made at first boot). Not `guest:guest`, so a
/// test can tell that the password is not in a message.
pub const SCRATCH_USER: &str = "csa";
pub const SCRATCH_PASSWORD: &str = "Scr4tch-pw-x7";

/// How long a node may take to boot (seen here: 3-4 s on an idle 2-core machine; much more
/// when every test binary is building or running).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The directory with `rabbitmq-server` and `rabbitmqctl`, to run as the current user.
///
/// `CELERY_SCALE_RABBITMQ_SBIN` if set; else Debian's and Ubuntu's `/usr/lib/rabbitmq/bin` (their
/// `/usr/sbin/rabbitmq-server` is a wrapper that switches to the `rabbitmq` user, its home and
/// its cookie); else wherever `rabbitmq-server` is on `PATH` (the generic Unix package).
pub fn rabbitmq_sbin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CELERY_SCALE_RABBITMQ_SBIN") {
        return Some(PathBuf::from(dir));
    }
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return Some(debian);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .find(|d| d.join("rabbitmq-server").exists() && d.join("rabbitmqctl").exists())
}

use celery_scale_testing::free_port;

/// Certificates made for one test: a CA, a server certificate for `localhost` and `127.0.0.1`,
/// and a client certificate (PEM, and PKCS#12 with a password), all signed by the CA.
pub struct TestPki {
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub client_p12_file: PathBuf,
    pub client_p12_password: String,
    /// A second, unrelated CA (signed nothing here).
    pub other_ca_file: PathBuf,
}

impl TestPki {
    /// Makes the certificates in `dir`.
    pub fn make(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_params = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p
        };
        let ca = CertifiedIssuer::self_signed(
            ca_params("celery-scale test CA"),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let other = CertifiedIssuer::self_signed(
            ca_params("celery-scale other CA"),
            KeyPair::generate().unwrap(),
        )
        .unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "celery-scale");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca).unwrap();

        let write = |name: &str, content: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        // PKCS#12 as OpenSSL 3 writes it by default (PBES2 with AES-256, HMAC-SHA256).
        let password = "p12-Pa55word".to_string();
        let mut store = p12_keystore::KeyStore::new();
        store.add_entry(
            "celery-scale",
            p12_keystore::KeyStoreEntry::PrivateKeyChain(p12_keystore::PrivateKeyChain::new(
                client_key.serialize_der(),
                b"celery-scale",
                [
                    p12_keystore::Certificate::from_der(client_cert.der()).unwrap(),
                    p12_keystore::Certificate::from_der(ca.der()).unwrap(),
                ],
            )),
        );
        let p12 = store.writer(&password).write().unwrap();
        TestPki {
            ca_file: write("ca.pem", ca.pem().as_bytes()),
            server_cert_file: write("server.pem", server_cert.pem().as_bytes()),
            server_key_file: write("server.key", server_key.serialize_pem().as_bytes()),
            client_cert_file: write("client.pem", client_cert.pem().as_bytes()),
            client_key_file: write("client.key", client_key.serialize_pem().as_bytes()),
            client_p12_file: write("client.p12", &p12),
            client_p12_password: password,
            other_ca_file: write("other-ca.pem", other.pem().as_bytes()),
        }
    }
}

/// The TLS listener of a [`ScratchBroker`].
#[derive(Clone, Copy, Debug)]
pub struct ScratchTls {
    /// `verify_peer` with `fail_if_no_peer_cert`: clients must present a certificate the test
    /// CA signed (mutual TLS); otherwise `verify_none`.
    pub require_client_cert: bool,
    /// Also run the management API, over HTTPS only with the same server certificate (its
    /// plain HTTP listener moved to a free port as well, off the shared broker's 15672).
    pub https_management: bool,
}

/// A RabbitMQ node of its own, stopped and deleted when dropped.
pub struct ScratchBroker {
    pub node: String,
    /// The plain AMQP port (the tests' publisher uses it).
    pub port: u16,
    /// The TLS port, with [`ScratchTls`].
    pub tls_port: Option<u16>,
    /// The management API's HTTPS and HTTP ports, with [`ScratchTls::https_management`].
    pub management_ports: Option<(u16, u16)>,
    pub pki: Option<TestPki>,
    /// How long each start took, until the node accepted an AMQP connection.
    pub starts: Vec<Duration>,
    dist_port: u16,
    dir: PathBuf,
    sbin: PathBuf,
    child: Option<Child>,
}

impl ScratchBroker {
    /// Starts a node (with a TLS listener and certificates made for it when `tls` is set) and
    /// waits until it accepts AMQP. `None` (skip) when RabbitMQ is not installed, outside CI;
    /// with CI=true that is a failure.
    pub async fn start(tls: Option<ScratchTls>) -> Option<Self> {
        let Some(sbin) = rabbitmq_sbin() else {
            assert!(
                !ci(),
                "rabbitmq-server is not installed and CI=true (scripts/services.sh installs it)"
            );
            eprintln!("skipping: rabbitmq-server is not installed");
            return None;
        };
        static N: AtomicU64 = AtomicU64::new(0);
        let node = format!(
            "csa-{}-{}@localhost",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(node.replace('@', "-"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = tls.map(|_| TestPki::make(&dir.join("pki")));
        let mut broker = ScratchBroker {
            node,
            port: 0,
            tls_port: None,
            management_ports: None,
            pki,
            starts: Vec::new(),
            dist_port: 0,
            dir,
            sbin,
            child: None,
        };
        // A port picked free can be taken before the node binds it: then try other ports.
        for attempt in 1..=3 {
            broker.port = free_port();
            broker.dist_port = free_port();
            broker.tls_port = tls.map(|_| free_port());
            broker.management_ports = tls
                .filter(|t| t.https_management)
                .map(|_| (free_port(), free_port()));
            broker.write_files(tls);
            match broker.boot().await {
                Ok(took) => {
                    eprintln!(
                        "scratch RabbitMQ node {} started in {took:?} (AMQP {}, TLS {:?})",
                        broker.node, broker.port, broker.tls_port
                    );
                    return Some(broker);
                }
                Err(log) if attempt < 3 && log.contains("eaddrinuse") => {
                    eprintln!("scratch node {}: a port was taken; retrying", broker.node);
                    let _ = std::fs::remove_dir_all(broker.dir.join("mnesia"));
                }
                Err(log) => panic!(
                    "scratch RabbitMQ node {} did not start:\n{log}",
                    broker.node
                ),
            }
        }
        unreachable!()
    }

    /// `amqp://csa:<password>@127.0.0.1:<port>/%2f`
    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://{SCRATCH_USER}:{SCRATCH_PASSWORD}@127.0.0.1:{}/%2f",
            self.port
        )
    }

    /// `amqps://csa:<password>@127.0.0.1:<tls port>/%2f` (the server certificate names
    /// 127.0.0.1).
    pub fn amqps_url(&self) -> String {
        format!(
            "amqps://{SCRATCH_USER}:{SCRATCH_PASSWORD}@127.0.0.1:{}/%2f",
            self.tls_port.expect("a node with a TLS listener")
        )
    }

    /// `https://csa:<password>@127.0.0.1:<port>` of the management API over HTTPS.
    pub fn management_url(&self) -> String {
        let (https, _) = self
            .management_ports
            .expect("a node with the HTTPS management API");
        format!("https://{SCRATCH_USER}:{SCRATCH_PASSWORD}@127.0.0.1:{https}")
    }

    fn write_files(&self, tls: Option<ScratchTls>) {
        let d = &self.dir;
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{}\n\
             default_user = {SCRATCH_USER}\n\
             default_pass = {SCRATCH_PASSWORD}\n\
             loopback_users.guest = true\n\
             disk_free_limit.absolute = 10MB\n",
            self.port
        );
        if let (Some(tls), Some(pki), Some(tls_port)) = (tls, &self.pki, self.tls_port) {
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = {}\n\
                 ssl_options.fail_if_no_peer_cert = {}\n",
                pki.ca_file.display(),
                pki.server_cert_file.display(),
                pki.server_key_file.display(),
                if tls.require_client_cert {
                    "verify_peer"
                } else {
                    "verify_none"
                },
                tls.require_client_cert,
            ));
        }
        let mut plugins = "[].\n";
        if let (Some(pki), Some((https, http))) = (&self.pki, self.management_ports) {
            conf.push_str(&format!(
                "management.tcp.ip = 127.0.0.1\n\
                 management.tcp.port = {http}\n\
                 management.ssl.ip = 127.0.0.1\n\
                 management.ssl.port = {https}\n\
                 management.ssl.cacertfile = {}\n\
                 management.ssl.certfile = {}\n\
                 management.ssl.keyfile = {}\n",
                pki.ca_file.display(),
                pki.server_cert_file.display(),
                pki.server_key_file.display(),
            ));
            plugins = "[rabbitmq_management].\n";
        }
        std::fs::write(d.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(d.join("enabled_plugins"), plugins).unwrap();
        // Instead of /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
        std::fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        let cookie = d.join(".erlang.cookie");
        if !cookie.exists() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(
                &cookie,
                format!("CSACOOKIE{}", self.node.replace(['@', '-'], "")),
            )
            .unwrap();
            std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
    }

    /// The environment of the node and of `rabbitmqctl` for it.
    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.current_dir(d)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", d.join("plugins-expand"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d.join("node.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            // The start script then execs the Erlang VM: the child is the node itself.
            .env("RUNNING_UNDER_SYSTEMD", "true");
    }

    /// Spawns the node and waits until it accepts an AMQP connection; on failure, returns its
    /// output and log.
    async fn boot(&mut self) -> Result<Duration, String> {
        let started = Instant::now();
        let out = std::fs::File::create(self.dir.join("stdout.log")).unwrap();
        let mut cmd = Command::new(self.sbin.join("rabbitmq-server"));
        self.env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
        self.child = Some(cmd.spawn().expect("spawn rabbitmq-server"));
        let url = self.amqp_url();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited with {status}\n{}", self.logs()));
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await;
            if let Ok(Ok(conn)) = attempt {
                let _ = conn.close(200, "ready".into()).await;
                break;
            }
            if started.elapsed() > BOOT_DEADLINE {
                self.kill();
                return Err(format!(
                    "no AMQP connection within {BOOT_DEADLINE:?}\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = started.elapsed();
        self.starts.push(took);
        Ok(took)
    }

    /// The node's console output and the end of its log.
    pub fn logs(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let log = read(self.dir.join("log").join(format!("{}.log", self.node)));
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "--- console ---\n{}\n--- log (last 40 lines) ---\n{}",
            read(self.dir.join("stdout.log")),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Stops the node for real (`rabbitmqctl stop`: clients get `CONNECTION_FORCED`, then the
    /// VM exits) and waits until it has exited. Its data stays for [`ScratchBroker::start_again`].
    pub async fn stop(&mut self) {
        let mut ctl = Command::new(self.sbin.join("rabbitmqctl"));
        self.env(&mut ctl);
        ctl.args(["-n", &self.node, "stop"]);
        let out = tokio::process::Command::from(ctl)
            .output()
            .await
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} stop: {}{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(child) = self.child.as_mut() {
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} still running 60 s after rabbitmqctl stop",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "nothing listens on {} once the node is down",
            self.port
        );
    }

    /// Starts the stopped node again, with the same name, ports and data; returns how long it
    /// took to accept AMQP.
    pub async fn start_again(&mut self) -> Duration {
        assert!(self.child.is_none(), "the node is running");
        match self.boot().await {
            Ok(took) => {
                eprintln!("scratch RabbitMQ node {} restarted in {took:?}", self.node);
                took
            }
            Err(log) => panic!("scratch node {} did not start again:\n{log}", self.node),
        }
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    pub async fn restart(&mut self) -> Duration {
        self.stop().await;
        self.start_again().await
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM is a clean shutdown for the Erlang VM; SIGKILL if it takes too long.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // The whole process group: the VM and its helper processes.
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ScratchBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

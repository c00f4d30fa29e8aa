//! Test helpers shared by celery-scale's crates (unpublished): unique names, the services the
//! test script starts, the Celery test app (`testing/celery`) as producer and worker, moto
//! fixtures made through boto3, and the daemon binary as a child process.
//!
//! Everything is blocking: tests call it from any runtime or none.

#[cfg(feature = "sqs")]
pub mod sqs;

mod proxy;
pub use proxy::Proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A name no other test (or test run) uses: `prefix-pid-nanos-counter`.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The value of `var` (set by `scripts/test.sh`). Without it the test is skipped (`None`),
/// except under `CI=true`, where a missing service fails the test.
pub fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{var} is not set and CI=true: a test service is missing (run scripts/test.sh)")
        }
        _ => {
            eprintln!("skipping: {var} is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// The services the end-to-end tests use, or `None` to skip (see [`service`]).
#[derive(Debug, Clone)]
pub struct Services {
    /// `redis://127.0.0.1:6379` (no database).
    pub redis: String,
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp: String,
    /// moto's server, `http://127.0.0.1:5000`.
    pub moto: String,
    /// The test venv's python (with Celery, kombu, boto3).
    pub python: String,
}

impl Services {
    /// Every service, or `None` to skip.
    pub fn get() -> Option<Self> {
        Some(Services {
            redis: service("CELERY_SCALE_REDIS_URL")?,
            amqp: service("CELERY_SCALE_AMQP_URL")?,
            moto: service("CELERY_SCALE_MOTO_URL")?,
            python: service("CELERY_SCALE_PYTHON")?,
        })
    }

    /// The Redis URL of database `db`.
    pub fn redis_db(&self, db: u32) -> String {
        format!("{}/{db}", self.redis.trim_end_matches('/'))
    }

    /// The environment the AWS SDK (ours and boto3) needs to talk to moto.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.moto.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }
}

/// `testing/celery`: the Celery test app, the publisher and the moto set-up scripts.
pub fn celery_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testing/celery")
}

/// Runs a Python script (or `-c` snippet) of the Celery test app against `broker`, whatever
/// its exit status.
pub fn python_unchecked(
    py: &str,
    broker: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> std::process::Output {
    Command::new(py)
        .args(args)
        .current_dir(celery_dir())
        .env("PYTHONPATH", celery_dir())
        .env("CELERY_SCALE_TEST_BROKER", broker)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run the Celery test app's python")
}

/// As [`python_unchecked`]; the script must succeed. Returns its stdout.
pub fn python(py: &str, broker: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let out = python_unchecked(py, broker, args, env);
    assert!(
        out.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a publisher script of the test app (`publish.py`, `redis_publish.py`) against `broker`
/// with Celery's `broker_transport_options` and extra settings; returns the JSON object it
/// printed last (for `publish.py`: `{"published": N, "kombu_size": {queue: n}}`).
pub fn publish_script(
    script: &str,
    py: &str,
    broker: &str,
    options: &serde_json::Value,
    config: &serde_json::Value,
    args: &[&str],
) -> serde_json::Value {
    let out = Command::new(py)
        .arg(script)
        .args(args)
        .current_dir(celery_dir())
        .env("PYTHONPATH", celery_dir())
        .env("CELERY_SCALE_TEST_BROKER", broker)
        .env("CELERY_SCALE_TEST_OPTIONS", options.to_string())
        .env("CELERY_SCALE_TEST_CONFIG", config.to_string())
        .output()
        .expect("run the Celery test app's publisher");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed {stdout:?}: {e}"))
}

/// Publishes `count` tasks sleeping `seconds` each on `queue`.
pub fn publish(py: &str, broker: &str, queue: &str, count: u32, seconds: f64) {
    let (count, seconds) = (count.to_string(), seconds.to_string());
    let args = ["--queue", queue, "--count", &count, "--seconds", &seconds];
    let none = serde_json::json!({});
    publish_script("publish.py", py, broker, &none, &none, &args);
}

/// A real Celery worker of the test app, in its own process group, killed with its pool when
/// dropped (also when the test fails). Made by [`WorkerCommand`].
#[derive(Debug)]
pub struct Worker {
    child: Option<Child>,
    /// The main process's id.
    pub pid: u32,
    /// Its node name as given to `-n` (`%h` not expanded).
    pub hostname: String,
    log: PathBuf,
}

/// How to start a [`Worker`]: `celery -A app worker -c 4 --prefetch-multiplier 1 -Q celery
/// -n celery@%h --without-mingle --without-gossip` unless told otherwise.
#[derive(Debug)]
pub struct WorkerCommand {
    py: String,
    broker: String,
    queues: String,
    name: Option<String>,
    concurrency: u32,
    prefetch: u32,
    options: Option<String>,
    config: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// A worker of the test app run by the venv's `py`, on `broker`.
    pub fn new(py: &str, broker: &str) -> Self {
        WorkerCommand {
            py: py.to_string(),
            broker: broker.to_string(),
            queues: "celery".into(),
            name: None,
            concurrency: 4,
            prefetch: 1,
            options: None,
            config: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The queues it consumes (`-Q`, comma-separated).
    pub fn queues(mut self, queues: &str) -> Self {
        self.queues = queues.to_string();
        self
    }

    /// Its node name (`-n`); default `{queues}@%h`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Pool processes (`-c`).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// `--prefetch-multiplier`.
    pub fn prefetch_multiplier(mut self, n: u32) -> Self {
        self.prefetch = n;
        self
    }

    /// Celery's `broker_transport_options` (JSON).
    pub fn transport_options(mut self, options: &serde_json::Value) -> Self {
        self.options = Some(options.to_string());
        self
    }

    /// Extra Celery settings (JSON, e.g. `{"task_acks_late": true}`).
    pub fn config(mut self, config: &serde_json::Value) -> Self {
        self.config = Some(config.to_string());
        self
    }

    /// Extra worker arguments; later ones win (e.g. `-P solo`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An extra environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts it (its log goes to a temporary file, see [`Worker::log_tail`]).
    pub fn spawn(self) -> Worker {
        use std::os::unix::process::CommandExt as _;
        let celery = PathBuf::from(&self.py).with_file_name("celery");
        let hostname = self
            .name
            .clone()
            .unwrap_or_else(|| format!("{}@%h", self.queues));
        let log = std::env::temp_dir().join(format!("{}.log", unique("celery-worker")));
        let log_file = std::fs::File::create(&log).expect("a worker log file");
        let mut cmd = Command::new(celery);
        cmd.args(["-A", "app", "worker", "-l", "INFO"])
            .args(["-c", &self.concurrency.to_string()])
            .args(["--prefetch-multiplier", &self.prefetch.to_string()])
            .args(["-Q", &self.queues, "-n", &hostname])
            .args(["--without-mingle", "--without-gossip"])
            .args(&self.args)
            .current_dir(celery_dir())
            .env("PYTHONPATH", celery_dir())
            .env("CELERY_SCALE_TEST_BROKER", &self.broker)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0);
        if let Some(options) = &self.options {
            cmd.env("CELERY_SCALE_TEST_OPTIONS", options);
        }
        if let Some(config) = &self.config {
            cmd.env("CELERY_SCALE_TEST_CONFIG", config);
        }
        let child = cmd.spawn().expect("start a Celery worker");
        Worker {
            pid: child.id(),
            child: Some(child),
            hostname,
            log,
        }
    }
}

impl Worker {
    /// `celery -A app worker -c 4 --prefetch-multiplier 1 -Q queue -n queue@%h`, plus `args`.
    pub fn start(py: &str, broker: &str, queue: &str, args: &[&str]) -> Self {
        WorkerCommand::new(py, broker)
            .queues(queue)
            .args(args)
            .spawn()
    }

    /// As [`Worker::start`], with extra environment variables.
    pub fn start_with_env(
        py: &str,
        broker: &str,
        queue: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        env.iter()
            .fold(
                WorkerCommand::new(py, broker).queues(queue).args(args),
                |cmd, (k, v)| cmd.env(k, v),
            )
            .spawn()
    }

    /// The last 30 lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends SIGTERM (Celery's warm shutdown) to the main process.
    pub fn terminate(&self) {
        if self.child.is_some() {
            send_signal(self.pid, "TERM");
        }
    }

    /// Kills the whole process group at once (SIGKILL: a cold stop, as a platform's stop timeout
    /// does).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the main process has exited (does not wait).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            None | Some(Ok(Some(_))) | Some(Err(_)) => {
                self.child = None;
                true
            }
            Some(Ok(None)) => false,
        }
    }

    /// Whether the main process has exited; waits up to `within` without blocking the runtime.
    pub async fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None | Some(Ok(Some(_))) | Some(Err(_)) => {
                    self.child = None;
                    return true;
                }
                Some(Ok(None)) if Instant::now() >= deadline => return false,
                Some(Ok(None)) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Sends `kill -SIGNAL pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `deadline` saying `what`
/// (the async twin of [`wait_for`], for tests whose sources run on the test's runtime).
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` every 250 ms until it returns `Some`, or panics naming `what` (with `context()`'s
/// text) after `within`.
pub fn wait_for<T>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not reached within {within:?}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Which moto target a test scales.
#[derive(Debug, Clone)]
pub enum Target {
    /// An ECS service (cluster, service).
    Ecs {
        /// The cluster.
        cluster: String,
        /// The service.
        service: String,
    },
    /// An Auto Scaling Group.
    Ec2 {
        /// The group.
        group: String,
    },
}

/// A target made on moto through boto3, deleted when dropped.
#[derive(Debug)]
pub struct MotoTarget {
    /// What it is.
    pub target: Target,
    services: Services,
    /// Whether dropping it deletes it (not for fixed names that tests running at the same time
    /// may share).
    owned: bool,
}

impl MotoTarget {
    /// A new ECS service `workers` in a new cluster named after `prefix`, at desired 0.
    pub fn ecs(services: &Services, prefix: &str) -> Self {
        Self::ecs_at(services, prefix, 0)
    }

    /// As [`MotoTarget::ecs`], at desired `desired`.
    pub fn ecs_at(services: &Services, prefix: &str, desired: u32) -> Self {
        let t = MotoTarget {
            target: Target::Ecs {
                cluster: unique(prefix),
                service: "workers".into(),
            },
            services: services.clone(),
            owned: true,
        };
        t.script("create", &["--desired", &desired.to_string()]);
        t
    }

    /// The ECS service `service` in cluster `cluster` (as a sample configuration names them),
    /// made if missing, at desired `desired`.
    pub fn ecs_named(services: &Services, cluster: &str, service: &str, desired: u32) -> Self {
        let t = MotoTarget {
            target: Target::Ecs {
                cluster: cluster.into(),
                service: service.into(),
            },
            services: services.clone(),
            owned: false,
        };
        let out = t.script_unchecked("show", &[]);
        if !out.status.success() {
            t.script("create", &["--desired", &desired.to_string()]);
        }
        t
    }

    /// The Auto Scaling Group `group` (as a sample configuration names it), made if missing.
    pub fn ec2_named(services: &Services, group: &str, max: u32) -> Self {
        let t = MotoTarget {
            target: Target::Ec2 {
                group: group.into(),
            },
            services: services.clone(),
            owned: false,
        };
        let shown = t.script_unchecked("show", &[]);
        if !shown.status.success()
            || String::from_utf8_lossy(&shown.stdout).contains("\"missing\": true")
        {
            t.script(
                "create",
                &["--min", "0", "--max", &max.to_string(), "--desired", "0"],
            );
        }
        t
    }

    /// A new Auto Scaling Group named after `prefix`, sized 0..=`max`, at desired 0.
    pub fn ec2(services: &Services, prefix: &str, max: u32) -> Self {
        let t = MotoTarget {
            target: Target::Ec2 {
                group: unique(prefix),
            },
            services: services.clone(),
            owned: true,
        };
        t.script(
            "create",
            &["--min", "0", "--max", &max.to_string(), "--desired", "0"],
        );
        t
    }

    fn script(&self, command: &str, extra: &[&str]) -> String {
        let out = self.script_unchecked(command, extra);
        assert!(
            out.status.success(),
            "{command} {:?} failed: {}",
            self.target,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn script_unchecked(&self, command: &str, extra: &[&str]) -> std::process::Output {
        let mut args: Vec<String> = match &self.target {
            Target::Ecs { cluster, service } => vec![
                "ecs_setup.py".into(),
                command.into(),
                "--cluster".into(),
                cluster.clone(),
                "--service".into(),
                service.clone(),
            ],
            Target::Ec2 { group } => vec![
                "ec2_setup.py".into(),
                command.into(),
                "--group".into(),
                group.clone(),
            ],
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        python_unchecked(
            &self.services.python,
            "memory://",
            &args,
            &self.services.aws_env(),
        )
    }

    /// The target's desired count now.
    pub fn desired(&self) -> u64 {
        let out = self.script("show", &[]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("set-up script JSON");
        v["desired"].as_u64().expect("a desired count")
    }

    /// The `[bindings.scaler]` TOML table for this target with `per_unit` workers per unit.
    pub fn scaler_toml(&self, per_unit: u32) -> String {
        match &self.target {
            Target::Ecs { cluster, service } => format!(
                "kind = \"ecs\"\ncluster = \"{cluster}\"\nservice = \"{service}\"\nworkers_per_task = {per_unit}\n"
            ),
            Target::Ec2 { group } => format!(
                "kind = \"ec2\"\ngroup_name = \"{group}\"\nworkers_per_instance = {per_unit}\nhonor_cooldown = false\n"
            ),
        }
    }
}

impl Drop for MotoTarget {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let (script, args): (&str, Vec<String>) = match &self.target {
            Target::Ecs { cluster, service } => (
                "ecs_setup.py",
                vec![
                    "--cluster".into(),
                    cluster.clone(),
                    "--service".into(),
                    service.clone(),
                ],
            ),
            Target::Ec2 { group } => ("ec2_setup.py", vec!["--group".into(), group.clone()]),
        };
        let mut all = vec![script.to_string(), "delete".into()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let _ = python_unchecked(
            &self.services.python,
            "memory://",
            &all,
            &self.services.aws_env(),
        );
    }
}

/// The daemon binary run as a child process, its output (stdout and stderr) in a file; killed
/// when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `binary` with `args` and `env` (on top of this process's environment), writing
    /// its output to `log`.
    pub fn start(binary: &Path, args: &[&str], env: &[(&str, String)], log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("create the daemon's log file");
        let err = out.try_clone().expect("clone the log file");
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the daemon");
        Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// Everything it wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines it wrote.
    pub fn tail(&self, n: usize) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends `signal` (e.g. `TERM`).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// SIGTERM, then waits up to `within` for it to exit; its exit status.
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait(within)
    }

    /// Waits up to `within` for it to exit (killing it after that); its exit status.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is running");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait for the killed daemon");
                panic!(
                    "the daemon did not exit within {within:?} (killed: {status}); its output:\n{}",
                    self.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `binary` with `args` and `env` to completion; (status, stdout, stderr).
pub fn run(binary: &Path, args: &[&str], env: &[(&str, String)]) -> (ExitStatus, String, String) {
    let out = Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run the binary");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh temporary directory for one test, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new directory under the system's temporary directory.
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET path` on `addr` (HTTP/1.0, no TLS): (status code, body), or `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Reads one HTTP/1.1 request from `sock`: its head (request line and headers) and its body of
/// `Content-Length` bytes, for the stub servers of tests. `None` when the peer closes first.
pub async fn read_http_request(sock: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            })
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return Some((text[..end].to_string(), body));
        }
    }
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A throwaway `redis-server` on a port of its own (no persistence), killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    /// Its plain port on 127.0.0.1 (unused when it listens with TLS only).
    pub port: u16,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it listens.
    pub fn start() -> Self {
        RedisServer::start_with(&[])
    }

    /// As [`RedisServer::start`], with extra `redis-server` arguments. With `--tls-port P` it
    /// listens with TLS only, on `P`.
    pub fn start_with(extra: &[String]) -> Self {
        let port = free_port();
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .into_iter()
            .chain(["--daemonize", "no"])
            .map(String::from)
            .collect();
        let tls = extra.iter().any(|a| a == "--tls-port");
        args.extend(["--port".into(), if tls { 0 } else { port }.to_string()]);
        args.extend(extra.iter().cloned());
        let mut server = RedisServer {
            child: None,
            port,
            args,
        };
        server.restart();
        server
    }

    /// Its URL, database `db`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Kills it (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same arguments (empty) and waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services.sh installs it)");
        self.child = Some(child);
        let listen_port = self
            .args
            .iter()
            .position(|a| a == "--tls-port")
            .and_then(|i| self.args.get(i + 1)?.parse().ok())
            .unwrap_or(self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {listen_port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

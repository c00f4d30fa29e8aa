//! Celery's `broker_url` and `broker_transport_options` read as kombu reads them: every URL here
//! is given to kombu itself (the test venv's `kombu.Connection`, walking a failover list with
//! `maybe_switch_next` as kombu's failover does, applying the transport options as
//! `pyamqp.Transport.establish_connection` does) and to celery-scale, and the brokers they
//! would connect to must be the same: scheme (TLS or not), host, port, user, password, vhost,
//! heartbeat and login method. URLs that kombu refuses must be refused here too.
//!
//! Two forms are left out because kombu cannot connect to them: an IPv6 address
//! (`amqp://[::1]:5673`: kombu hands py-amqp `::1:5673`, which it does not split) and a bare
//! `host:port` alternate (`...;h2:5690`: py-amqp gets `h2:5690:5672`). celery-scale connects to
//! the address and port written (the unit tests of `broker_url.rs` check both).

use std::process::Command;

use celery_scale_amqp::AmqpSourceConfig;
use serde_json::{Value, json};

/// The venv Python with kombu, or `None` (skip) when unset outside CI; under `CI=true` a missing
/// one fails the test.
fn python() -> Option<String> {
    celery_scale_testing::service("CELERY_SCALE_PYTHON")
}

/// What kombu makes of `url` with `options`: one object per broker of the list, or `{"error":
/// ...}`.
const KOMBU: &str = r#"
import json, sys
from kombu import Connection
out = []
for case in json.loads(sys.argv[1]):
    url, options = case["url"], case["options"]
    try:
        c = Connection(url, transport_options=options)
        brokers = []
        for i in range(max(len(c.alt), 1)):
            if i:
                c.maybe_switch_next()
            t = c.transport  # SSLTransport sets ssl for amqps://
            d = t.default_connection_params
            for name, default in d.items():  # as establish_connection fills them
                if not getattr(c, name, None):
                    setattr(c, name, default)
            opts = dict({
                "host": c.host, "userid": c.userid, "password": c.password,
                "virtual_host": c.virtual_host, "ssl": c.ssl, "heartbeat": c.heartbeat,
                "login_method": c.login_method,
            }, **(c.transport_options or {}))
            hostname, _, port = opts["host"].rpartition(":")
            brokers.append({
                "tls": bool(opts["ssl"]), "host": hostname.strip("[]"), "port": int(port),
                "user": opts["userid"], "password": opts["password"],
                "vhost": opts["virtual_host"],
                "heartbeat": float(opts["heartbeat"] or 0) or None,
                "login_method": opts["login_method"],
            })
        out.append(brokers)
    except Exception as e:
        out.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"#;

fn kombu(py: &str, cases: &[(&str, Value)]) -> Vec<Value> {
    let cases: Vec<Value> = cases
        .iter()
        .map(|(url, options)| json!({"url": url, "options": options}))
        .collect();
    let out = Command::new(py)
        .args(["-c", KOMBU, &Value::from(cases).to_string()])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn ours(url: &str, options: &Value) -> Result<Vec<Value>, String> {
    let mut config = AmqpSourceConfig::builder(url).queue("celery");
    for (k, v) in options.as_object().unwrap() {
        config = config.transport_option(k.as_str(), v.clone());
    }
    let config = config.build().map_err(|e| e.to_string())?;
    let brokers = config.brokers().map_err(|e| e.to_string())?;
    Ok(brokers
        .iter()
        .map(|b| {
            json!({
                "tls": b.tls(), "host": b.host(), "port": b.port(), "user": b.user(),
                // The password is not public: compared through the management URL derived
                // from it (percent-encoded there).
                "vhost": b.vhost(),
                "heartbeat": b.heartbeat(),
                "login_method": b.login_method(),
            })
        })
        .collect())
}

/// Whether kombu's view of one broker matches ours (the heartbeat rounded up to seconds).
fn same(kombu: &Value, ours: &Value) -> bool {
    let heartbeat = kombu["heartbeat"]
        .as_f64()
        .map(|h| h.ceil() as u64)
        .map_or(Value::Null, Value::from);
    let login = kombu["login_method"].clone();
    ["tls", "host", "port", "user", "vhost"]
        .iter()
        .all(|k| kombu[k] == ours[k])
        && (ours["heartbeat"] == heartbeat || heartbeat.is_null())
        && login == ours["login_method"]
}

#[test]
fn broker_urls_read_as_kombu_reads_them() {
    let Some(py) = python() else {
        return;
    };
    let none = json!({});
    let cases: Vec<(&str, Value)> = vec![
        ("amqp://", none.clone()),
        ("amqp://host", none.clone()),
        ("amqp://host/", none.clone()),
        ("amqp://host//", none.clone()),
        ("amqp://host/%2f", none.clone()),
        ("amqp://host//foo", none.clone()),
        ("amqp://host/a/b", none.clone()),
        ("amqp://host/v%C3%BC", none.clone()),
        ("pyamqp://u:p@h:1234/v", none.clone()),
        ("pyamqp://guest:guest@localhost//", none.clone()),
        ("amqps://h", none.clone()),
        ("amqps://u:p@h:5999/prod", none.clone()),
        ("AMQP://Host", none.clone()),
        ("amqp://bob@h", none.clone()),
        ("amqp://:pw@h", none.clone()),
        ("amqp://us%40er:p%3Aw@h", none.clone()),
        ("amqp://h:0/", none.clone()),
        ("amqp://h?ssl=false", none.clone()),
        ("amqp://h?ssl=1", none.clone()),
        ("amqp://h?ssl=", none.clone()),
        ("amqp://h?heartbeat=30", none.clone()),
        ("amqp://h?heartbeat=2.5", none.clone()),
        ("amqp://h?login_method=AMQPLAIN&insist=1", none.clone()),
        ("amqp://h/v?heartbeat=5#frag", none.clone()),
        // Failover lists: what each alternate inherits.
        ("amqp://u:p@h1:5673/v?heartbeat=7;amqp://h2", none.clone()),
        ("amqp://u:p@h1/v;h2", none.clone()),
        ("amqps://u:p@h1/v;amqp://h2:1/v", none.clone()),
        ("amqp://h1;pyamqp://x:y@h2//", none.clone()),
        (
            "amqp://u:p@h1//;amqp://u:p@h2//;amqp://u:p@h3//",
            none.clone(),
        ),
        // Transport options win over the URL.
        (
            "amqp://u:p@h/v",
            json!({"virtual_host": "other", "userid": "x", "heartbeat": 4, "confirm_publish": true}),
        ),
        ("amqp://h", json!({"ssl": true, "max_retries": 3})),
        ("amqp://h1;amqp://h2", json!({"login_method": "AMQPLAIN"})),
    ];
    let theirs = kombu(&py, &cases);
    for ((url, options), kombu) in cases.iter().zip(&theirs) {
        let ours = ours(url, options).unwrap_or_else(|e| panic!("{url}: {e}"));
        let kombu = kombu
            .as_array()
            .unwrap_or_else(|| panic!("kombu refused {url}: {kombu}"));
        assert_eq!(kombu.len(), ours.len(), "{url}");
        for (k, o) in kombu.iter().zip(&ours) {
            assert!(same(k, o), "{url} {options}:\n kombu {k}\n ours  {o}");
        }
    }

    // What kombu refuses (it raises at construction or at connect) is refused here, naming the
    // field.
    let refused = [
        "amqp://h?foo=1",
        "amqp://h?virtual_host=x",
        "amqp://h?heartbeat=abc",
        "amqp://h:99999",
        "amqp://h:port",
        "amqp://[::1/",
    ];
    let cases: Vec<(&str, Value)> = refused.iter().map(|u| (*u, none.clone())).collect();
    for ((url, _), kombu) in cases.iter().zip(kombu(&py, &cases)) {
        assert!(kombu.get("error").is_some(), "kombu took {url}: {kombu}");
        let e = ours(url, &none).unwrap_err();
        assert!(e.starts_with("url: "), "{url}: {e}");
    }
}

#[test]
fn passwords_reach_the_derived_management_api_as_kombu_reads_them() {
    // The AMQP password itself is not public; the management URL derived from the broker URL
    // carries it (percent-encoded), so a decoding mistake would show there.
    let c = AmqpSourceConfig::builder("amqp://us%40er:p%3Aw%2F@h/v;amqp://h2")
        .queue("q")
        .build()
        .unwrap();
    let urls: Vec<String> = c
        .management_urls()
        .unwrap()
        .iter()
        .map(|u| u.expose().to_string())
        .collect();
    assert_eq!(
        urls,
        [
            "http://us%40er:p%3Aw%2F@h:15672",
            // The alternate names no user: kombu's guest/guest.
            "http://guest:guest@h2:15672",
        ]
    );
    let c = AmqpSourceConfig::builder("amqp://u:p@h")
        .queue("q")
        .transport_option("manager_hostname", json!("mon"))
        .transport_option("manager_userid", json!("monitor"))
        .transport_option("manager_password", json!("s3cret"))
        .build()
        .unwrap();
    assert_eq!(
        c.management_urls().unwrap()[0].expose(),
        "http://monitor:s3cret@mon:15672"
    );
    assert!(!format!("{c:?}").contains("s3cret"));
}

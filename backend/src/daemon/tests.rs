//! Unit tests of the daemon without a socket.

use std::collections::HashMap;

use super::*;
use crate::rpc_server::SocketAccess;
use serde_json::json;
use snapmv_rpc::methods::names;

/// Random parameters for every method never panic the daemon and always get a success or
/// a documented error code. Paths are drawn from files inside a scratch directory only.
#[test]
fn random_params_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    for (n, len) in [
        ("o1", 1 << 20),
        ("o2", 1 << 20),
        ("c1", 16 << 20),
        ("c2", 16 << 20),
    ] {
        std::fs::File::create(p(n)).unwrap().set_len(len).unwrap();
    }
    let daemon = Daemon::open(&ServeConfig {
        rpc_socket: dir.path().join("rpc.sock"),
        state_dir: dir.path().join("state"),
        socket_dir: dir.path().join("sockets"),
        allowed_uids: vec![],
        socket_access: SocketAccess::default(),
        metrics_listen: None,
        low_space_percent: 90,
    })
    .unwrap();
    let paths: Vec<Value> = [
        "o1",
        "o2",
        "c1",
        "c2",
        "missing",
        "state/state.json",
        "state",
    ]
    .iter()
    .map(|n| json!(p(n)))
    .chain([json!("relative"), json!(""), json!("/nonexistent/x")])
    .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let value = |rng: &mut fastrand::Rng, key: &str| -> Value {
        match rng.u8(..10) {
            0 => Value::Null,
            1 => json!(rng.bool()),
            2 => json!(rng.i64(-3..300)),
            3 => json!(["x", 1]),
            4 => json!({"a": 1}),
            5 => json!(["a/b", "..", "", "vol", "v.1", &"x".repeat(70)][rng.usize(..6)]),
            _ => match key {
                "bind" | "format" => json!(rng.u8(..4) != 0),
                "origin" | "cow" | "socket" => paths[rng.usize(..paths.len())].clone(),
                "name" | "origin_id" => json!(["vol", "snap", "other"][rng.usize(..3)]),
                "tag" | "chunk_size" | "num_queues" | "queue_size" => json!(rng.u32(..5)),
                "memo" => json!("memo"),
                _ => json!(rng.bool()),
            },
        }
    };
    let mut methods: Vec<&str> = names::ALL.to_vec();
    methods.push("bogus");
    let known: Vec<i64> = codes::ALL.iter().map(|(c, _)| *c).collect();
    let mut outcomes: HashMap<i64, usize> = HashMap::new();
    let pick = |rng: &mut fastrand::Rng, v: &[&str]| json!(v[rng.usize(..v.len())]);
    for _ in 0..2000 {
        let method = methods[rng.usize(..methods.len())];
        // A plausible request for the method...
        let name = pick(&mut rng, &["vol", "snap", "other"]);
        let origin = pick(&mut rng, &["o1", "o2"]);
        let origin = json!(p(origin.as_str().unwrap_or("o1")));
        let cow = pick(&mut rng, &["c1", "c2"]);
        let cow = json!(p(cow.as_str().unwrap_or("c1")));
        let tag = json!(rng.u32(1..4));
        let base = match method {
            names::ORIGIN_CREATE => json!({"name": name, "origin": origin, "cow": cow,
                "bind": rng.bool(), "format": rng.u8(..4) == 0}),
            names::SNAPSHOT_EXPORT => {
                json!({"name": name, "origin": origin, "cow": cow, "tag": tag})
            }
            names::SNAPSHOT_CREATE if rng.bool() => json!({"names": [name, "other"], "memo": "m"}),
            names::SNAPSHOT_CREATE => json!({"name": name, "memo": "m"}),
            names::SNAPSHOT_MEMO => json!({"name": name, "tag": tag, "memo": "m"}),
            names::EXPORT_RENAME => json!({"name": name, "new_name": "renamed"}),
            names::SNAPSHOT_DELETE => json!({"name": name, "tag": tag}),
            names::SNAPSHOT_ROLLBACK => json!({"name": name, "tag": tag, "wait": rng.bool()}),
            names::EXPORT_LIST => json!({}),
            _ => json!({"name": name}),
        };
        // ...then mutated: values replaced by anything, keys dropped or added.
        let mut params = match base {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        let keys: Vec<String> = params.keys().cloned().collect();
        for k in keys {
            match rng.u8(..12) {
                0 => {
                    params.remove(&k);
                }
                1 | 2 => {
                    let v = value(&mut rng, &k);
                    params.insert(k, v);
                }
                _ => {}
            }
        }
        if rng.u8(..10) == 0 {
            let k = [
                "socket",
                "origin_id",
                "readonly",
                "chunk_size",
                "num_queues",
                "bogus",
            ][rng.usize(..6)];
            let v = value(&mut rng, k);
            params.insert(k.to_string(), v);
        }
        let params = if rng.u8(..20) == 0 {
            Value::Null
        } else {
            Value::Object(params)
        };
        match daemon.handle(method, params.clone()) {
            Ok(_) => *outcomes.entry(0).or_default() += 1,
            Err(e) => {
                *outcomes.entry(e.code).or_default() += 1;
                assert!(known.contains(&e.code), "{method} {params}: {e}");
                assert_ne!(e.code, codes::INTERNAL_ERROR, "{method} {params}: {e}");
                assert!(!e.message.is_empty());
            }
        }
    }
    eprintln!("outcomes (0 = success): {outcomes:?}");
    assert!(outcomes.get(&0).copied().unwrap_or(0) > 20, "{outcomes:?}");
    // Nothing was created outside the scratch directory's own files.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["c1", "c2", "o1", "o2", "sockets", "state"]);
}

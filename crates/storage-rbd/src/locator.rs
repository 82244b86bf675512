//! `rbd:` locators, spelled as QEMU spells its `rbd:` file names (docs/ceph.md):
//!
//! ```text
//! rbd:POOL/IMAGE[:OPTION=VALUE[:OPTION=VALUE...]]
//! rbd:POOL/NAMESPACE/IMAGE[:OPTION=VALUE...]
//! ```
//!
//! `conf=PATH` names the Ceph configuration file, `id=USER` the cephx user (without
//! `client.`); every other `OPTION=VALUE` is a Ceph option given to librados
//! (`rados_conf_set`), e.g. `mon_host=10.0.0.1` or `keyring=PATH`. A backslash escapes the next
//! character (`\:`, `\=`, `\@`, `\/`, `\\`). RBD snapshots (`@SNAP`) are refused: snapmv's
//! snapshots live in its store. Options that would break the crash contract or fencing
//! (`rbd_cache` other than false, `rbd_blocklist_on_break_lock` other than true) are refused.

/// A parsed `rbd:` locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    /// The pool.
    pub pool: String,
    /// The RBD namespace inside the pool, if any.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// `conf=`: the Ceph configuration file (default: librados' search, `$CEPH_CONF` first).
    pub conf: Option<String>,
    /// `id=`: the cephx user without `client.` (default: librados' default, `admin`).
    pub id: Option<String>,
    /// Every other `OPTION=VALUE`, in the order given.
    pub options: Vec<(String, String)>,
}

/// Why a locator was refused: names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad rbd locator: {part:?}: {reason}")]
pub struct LocatorError {
    /// The offending part of the locator (the whole locator for a missing prefix).
    pub part: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(part: &str, reason: impl Into<String>) -> LocatorError {
    LocatorError {
        part: part.to_string(),
        reason: reason.into(),
    }
}

/// Whether `s` is meant as an `rbd:` locator (rather than a path).
pub fn is_rbd_locator(s: &str) -> bool {
    s.starts_with("rbd:")
}

/// Splits at unescaped `sep`, keeping escapes (so that later splits see them).
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Removes escapes; a trailing lone backslash is an error.
fn unescape(part: &str) -> Result<String, LocatorError> {
    let mut out = String::with_capacity(part.len());
    let mut chars = part.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => return Err(bad(part, "ends with a lone backslash (escape nothing)")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn has_unescaped(s: &str, ch: char) -> bool {
    split_unescaped(s, ch).len() > 1
}

impl Locator {
    /// Parses `rbd:POOL[/NAMESPACE]/IMAGE[:OPTION=VALUE...]`.
    pub fn parse(s: &str) -> Result<Locator, LocatorError> {
        let rest = s
            .strip_prefix("rbd:")
            .ok_or_else(|| bad(s, "an rbd locator starts with `rbd:`"))?;
        let fields = split_unescaped(rest, ':');
        let spec = fields[0];
        if has_unescaped(spec, '@') {
            return Err(bad(
                spec,
                "RBD snapshots (`@SNAP`) are not accepted: snapmv keeps its snapshots in its \
                 store; name the image only",
            ));
        }
        let names = split_unescaped(spec, '/');
        let (pool, namespace, image) = match names.as_slice() {
            [pool, image] => (*pool, None, *image),
            [pool, ns, image] => (*pool, Some(*ns), *image),
            [_] => {
                return Err(bad(
                    spec,
                    "expected POOL/IMAGE or POOL/NAMESPACE/IMAGE (no `/`)",
                ))
            }
            _ => {
                return Err(bad(
                    spec,
                    "expected POOL/IMAGE or POOL/NAMESPACE/IMAGE (too many `/`)",
                ))
            }
        };
        let pool = unescape(pool)?;
        if pool.is_empty() {
            return Err(bad(spec, "the pool name is empty"));
        }
        let namespace = match namespace {
            Some(ns) => {
                let ns = unescape(ns)?;
                if ns.is_empty() {
                    return Err(bad(
                        spec,
                        "the namespace is empty (omit it for the default)",
                    ));
                }
                Some(ns)
            }
            None => None,
        };
        let image = unescape(image)?;
        if image.is_empty() {
            return Err(bad(spec, "the image name is empty"));
        }
        let mut loc = Locator {
            pool,
            namespace,
            image,
            conf: None,
            id: None,
            options: Vec::new(),
        };
        for field in &fields[1..] {
            let kv = split_unescaped(field, '=');
            let [k, v] = kv.as_slice() else {
                return Err(bad(
                    field,
                    if kv.len() == 1 {
                        "an option must be OPTION=VALUE"
                    } else {
                        "more than one `=` (escape it as `\\=`)"
                    },
                ));
            };
            let key = unescape(k)?;
            let value = unescape(v)?;
            if key.is_empty() {
                return Err(bad(field, "the option name is empty"));
            }
            if value.is_empty() {
                return Err(bad(field, "the value is empty"));
            }
            // Ceph treats `-` and `_` alike in option names; so does this check.
            let norm = key.replace('-', "_");
            let seen = match norm.as_str() {
                "conf" => loc.conf.is_some(),
                "id" => loc.id.is_some(),
                _ => loc.options.iter().any(|(k, _)| k.replace('-', "_") == norm),
            };
            if seen {
                return Err(bad(field, format!("option {key} given twice")));
            }
            match norm.as_str() {
                "conf" => loc.conf = Some(value),
                "id" => {
                    if value.starts_with("client.") {
                        return Err(bad(field, "id= takes the user without `client.`"));
                    }
                    loc.id = Some(value)
                }
                "rbd_cache" if !matches!(value.as_str(), "false" | "0") => {
                    return Err(bad(
                        field,
                        "librbd's cache lives in this process and dies with it; snapmv runs \
                         with rbd_cache=false so that every completed write is in Ceph",
                    ))
                }
                "rbd_blocklist_on_break_lock" if !matches!(value.as_str(), "true" | "1") => {
                    return Err(bad(
                        field,
                        "taking over an image must blocklist (fence) its previous owner",
                    ))
                }
                _ => loc.options.push((key, value)),
            }
        }
        Ok(loc)
    }

    /// `rbd:POOL[/NAMESPACE]/IMAGE`, for messages: no options (a `key=` may be a secret).
    pub fn image_spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("rbd:{}/{}/{}", self.pool, ns, self.image),
            None => format!("rbd:{}/{}", self.pool, self.image),
        }
    }
}

impl std::str::FromStr for Locator {
    type Err = LocatorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Locator::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> LocatorError {
        Locator::parse(s).expect_err(s)
    }

    #[test]
    fn pool_and_image() {
        let l = Locator::parse("rbd:snapmv/vm1-disk").unwrap();
        assert_eq!(l.pool, "snapmv");
        assert_eq!(l.namespace, None);
        assert_eq!(l.image, "vm1-disk");
        assert_eq!((l.conf, l.id), (None, None));
        assert!(l.options.is_empty());
    }

    #[test]
    fn namespace_conf_id_and_options() {
        let l = Locator::parse(
            "rbd:vms/tenant-a/vm1:conf=/tmp/c/ceph.conf:id=snapmv:mon_host=10.0.0.1\\:3300:keyring=/k",
        )
        .unwrap();
        assert_eq!(l.pool, "vms");
        assert_eq!(l.namespace.as_deref(), Some("tenant-a"));
        assert_eq!(l.image, "vm1");
        assert_eq!(l.conf.as_deref(), Some("/tmp/c/ceph.conf"));
        assert_eq!(l.id.as_deref(), Some("snapmv"));
        assert_eq!(
            l.options,
            vec![
                ("mon_host".to_string(), "10.0.0.1:3300".to_string()),
                ("keyring".to_string(), "/k".to_string())
            ]
        );
        assert_eq!(l.image_spec(), "rbd:vms/tenant-a/vm1");
    }

    #[test]
    fn escapes() {
        let l = Locator::parse(r"rbd:p/a\@b\/c:conf=/x\=y:rbd_cache=false").unwrap();
        assert_eq!(l.image, "a@b/c");
        assert_eq!(l.conf.as_deref(), Some("/x=y"));
        assert_eq!(l.options, vec![("rbd_cache".into(), "false".into())]);
        assert_eq!(err(r"rbd:p/img\").part, r"img\");
    }

    #[test]
    fn errors_name_the_bad_part() {
        let e = err("/var/lib/x.img");
        assert_eq!(e.part, "/var/lib/x.img");
        assert!(e.to_string().contains("starts with `rbd:`"), "{e}");
        let e = err("rbd:pool");
        assert_eq!(e.part, "pool");
        assert!(e.reason.contains("POOL/IMAGE"), "{e}");
        assert_eq!(err("rbd:a/b/c/d").part, "a/b/c/d");
        assert!(err("rbd:/img").reason.contains("pool name is empty"));
        assert!(err("rbd:p/").reason.contains("image name is empty"));
        assert!(err("rbd:p//i").reason.contains("namespace is empty"));
        let e = err("rbd:p/img@snap1:id=x");
        assert_eq!(e.part, "p/img@snap1");
        assert!(e.reason.contains("snapshots"), "{e}");
        let e = err("rbd:p/i:id=snapmv:oops");
        assert_eq!(e.part, "oops");
        assert!(e.reason.contains("OPTION=VALUE"), "{e}");
        assert_eq!(err("rbd:p/i:a=b=c").part, "a=b=c");
        assert!(err("rbd:p/i:=v").reason.contains("name is empty"));
        assert!(err("rbd:p/i:conf=").reason.contains("value is empty"));
        let e = err("rbd:p/i:id=a:id=b");
        assert_eq!(
            (e.part.as_str(), e.reason.as_str()),
            ("id=b", "option id given twice")
        );
        assert!(err("rbd:p/i:mon-host=a:mon_host=b")
            .reason
            .contains("twice"));
        assert!(err("rbd:p/i:id=client.snapmv")
            .reason
            .contains("without `client.`"));
    }

    #[test]
    fn refuses_cache_and_unfenced_takeover() {
        let e = err("rbd:p/i:rbd_cache=true");
        assert_eq!(e.part, "rbd_cache=true");
        assert!(e.reason.contains("rbd_cache=false"), "{e}");
        assert!(err("rbd:p/i:rbd-cache=1")
            .reason
            .contains("rbd_cache=false"));
        assert!(Locator::parse("rbd:p/i:rbd_cache=false").is_ok());
        let e = err("rbd:p/i:rbd_blocklist_on_break_lock=false");
        assert!(e.reason.contains("blocklist"), "{e}");
    }

    #[test]
    fn recognises_locators() {
        assert!(is_rbd_locator("rbd:p/i"));
        assert!(!is_rbd_locator("/dev/rbd0"));
        assert!(!is_rbd_locator("./rbd:p/i"));
        assert_eq!(
            "rbd:p/i".parse::<Locator>().unwrap().image_spec(),
            "rbd:p/i"
        );
    }
}

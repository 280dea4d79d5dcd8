//! Value parsers for flags whose text has a shape: durations, memory sizes,
//! `--disk`, `--net` and `--metadata`. Each returns an error saying what it
//! accepts, which clap prints as a usage error (exit 2).

use std::time::Duration;

/// One `--disk PATH[,ro][,root][,id=ID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: String,
    pub read_only: bool,
    pub root: bool,
    pub id: Option<String>,
}

/// One `--net TAP[,MAC][,id=ID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<String>,
    pub id: Option<String>,
}

/// `500ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let expected = || format!("{text:?} is not a duration: use e.g. 500ms, 30s, 5m or 1h");
    let n: u64 = number.parse().map_err(|_| expected())?;
    let millis = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(expected)
}

/// A memory size in bytes from `512`, `512M`, `512MiB`, `2G`, `2GiB`, `1T`, `1TiB`
/// (binary units; a bare number is MiB, the unit VMCP requires memory in).
pub fn memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let expected = || format!("{text:?} is not a memory size: use e.g. 512MiB, 2GiB or 512 (MiB)");
    let n: u64 = number.parse().map_err(|_| expected())?;
    let shift = match unit.trim() {
        "" | "M" | "MiB" | "m" => 20,
        "G" | "GiB" | "g" => 30,
        "T" | "TiB" | "t" => 40,
        _ => return Err(expected()),
    };
    match n.checked_mul(1 << shift) {
        Some(bytes) if bytes > 0 && bytes <= i64::MAX as u64 => Ok(bytes),
        _ => Err(expected()),
    }
}

/// `PATH[,ro][,root][,id=ID]`.
pub fn disk(text: &str) -> Result<DiskSpec, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default().trim();
    if path.is_empty() {
        return Err(format!("{text:?}: expected PATH[,ro][,root][,id=ID]"));
    }
    let mut spec = DiskSpec {
        path: path.to_owned(),
        read_only: false,
        root: false,
        id: None,
    };
    for part in parts.map(str::trim) {
        match part {
            "ro" => spec.read_only = true,
            "rw" => spec.read_only = false,
            "root" => spec.root = true,
            _ => match part.strip_prefix("id=") {
                Some(id) if !id.is_empty() => spec.id = Some(id.to_owned()),
                _ => {
                    return Err(format!(
                        "{text:?}: unknown disk option {part:?} (expected ro, rw, root or id=ID)"
                    ));
                }
            },
        }
    }
    Ok(spec)
}

/// `TAP[,MAC][,id=ID]` (the MAC may also be written `mac=MAC`).
pub fn net(text: &str) -> Result<NetSpec, String> {
    let mut parts = text.split(',');
    let tap = parts.next().unwrap_or_default().trim();
    if tap.is_empty() {
        return Err(format!("{text:?}: expected TAP[,MAC][,id=ID]"));
    }
    let mut spec = NetSpec {
        tap: tap.to_owned(),
        mac: None,
        id: None,
    };
    for part in parts.map(str::trim) {
        if let Some(id) = part.strip_prefix("id=").filter(|id| !id.is_empty()) {
            spec.id = Some(id.to_owned());
        } else if let Some(mac) = part.strip_prefix("mac=").or(Some(part))
            && mac.split(':').count() == 6
            && spec.mac.is_none()
        {
            spec.mac = Some(mac.to_owned());
        } else {
            return Err(format!(
                "{text:?}: unknown network option {part:?} (expected a MAC such as \
                 52:54:00:12:34:56, or id=ID)"
            ));
        }
    }
    Ok(spec)
}

/// `KEY=VALUE` (the value may be empty and may contain `=`).
pub fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{text:?}: expected KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1s", "1.5s", "5 min", "99999999999999999999h"] {
            let err = duration(bad).expect_err(bad);
            assert!(err.contains("not a duration"), "{err}");
        }
    }

    #[test]
    fn memory_sizes_are_binary_and_default_to_mib() {
        assert_eq!(memory("512"), Ok(512 << 20));
        assert_eq!(memory("512MiB"), Ok(512 << 20));
        assert_eq!(memory("512M"), Ok(512 << 20));
        assert_eq!(memory("2GiB"), Ok(2 << 30));
        assert_eq!(memory("2G"), Ok(2 << 30));
        assert_eq!(memory("1TiB"), Ok(1 << 40));
        for bad in ["", "0", "512KiB", "1.5G", "GiB", "99999999999T"] {
            let err = memory(bad).expect_err(bad);
            assert!(err.contains("not a memory size"), "{err}");
        }
    }

    #[test]
    fn disk_specs() {
        assert_eq!(
            disk("/img/root.ext4,ro,root,id=rootfs"),
            Ok(DiskSpec {
                path: "/img/root.ext4".into(),
                read_only: true,
                root: true,
                id: Some("rootfs".into()),
            })
        );
        assert_eq!(
            disk("/img/data.raw"),
            Ok(DiskSpec {
                path: "/img/data.raw".into(),
                read_only: false,
                root: false,
                id: None,
            })
        );
        for bad in ["", ",ro", "/d,readonly", "/d,id="] {
            assert!(disk(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn net_specs() {
        assert_eq!(
            net("tap0,52:54:00:00:00:01,id=wan"),
            Ok(NetSpec {
                tap: "tap0".into(),
                mac: Some("52:54:00:00:00:01".into()),
                id: Some("wan".into()),
            })
        );
        assert_eq!(
            net("tap1,mac=52:54:00:00:00:02").map(|n| n.mac),
            Ok(Some("52:54:00:00:00:02".into()))
        );
        assert_eq!(net("tap2").map(|n| (n.mac, n.id)), Ok((None, None)));
        for bad in [
            "",
            ",52:54:00:00:00:01",
            "tap0,fast",
            "tap0,1:2:3:4:5:6,1:2:3:4:5:6",
        ] {
            assert!(net(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn key_values() {
        assert_eq!(key_value("team=edge"), Ok(("team".into(), "edge".into())));
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(key_value("empty="), Ok(("empty".into(), String::new())));
        assert!(key_value("novalue").is_err());
        assert!(key_value("=v").is_err());
    }
}

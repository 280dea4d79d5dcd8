//! A small parser for the Prometheus text exposition format, enough to check
//! metric names, types, labels and values without string matching.

use std::collections::{BTreeMap, HashMap};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Series name (with `_bucket`, `_sum`, `_count` suffixes as written).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// `# TYPE` per family.
    pub types: HashMap<String, String>,
    /// `# HELP` per family.
    pub help: HashMap<String, String>,
    /// Every sample in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Samples of series `name` whose labels include all of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The single value of series `name` with exactly these label values.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(name, labels).as_slice() {
            [one] => Some(one.value),
            _ => None,
        }
    }
}

/// Parses `text`, panicking with the line on malformed input.
pub fn parse(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad TYPE: {line}"));
            e.types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            e.help.insert(name.to_owned(), help.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        e.samples.push(parse_sample(line));
    }
    e
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = match line.find('{') {
        Some(_) => {
            let close = line
                .rfind('}')
                .unwrap_or_else(|| panic!("unclosed labels: {line}"));
            (&line[..close + 1], line[close + 1..].trim())
        }
        None => line
            .split_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}")),
    };
    let value = value
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no value: {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value {v:?}: {line}")),
    };
    let (name, labels) = match series.find('{') {
        Some(open) => (
            &series[..open],
            parse_labels(&series[open + 1..series.len() - 1], line),
        ),
        None => (series, BTreeMap::new()),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

fn parse_labels(mut s: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let eq = s.find('=').unwrap_or_else(|| panic!("bad label: {line}"));
        let key = s[..eq].trim().to_owned();
        let rest = &s[eq + 1..];
        assert!(rest.starts_with('"'), "unquoted label value: {line}");
        let mut value = String::new();
        let mut chars = rest[1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => panic!("dangling escape: {line}"),
                },
                '"' => {
                    end = Some(i + 2);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated label value: {line}"));
        labels.insert(key, value);
        s = rest[end..].trim_start_matches(',');
    }
    labels
}

#[test]
fn parser_reads_labels_escapes_and_infinities() {
    let e = parse(
        "# HELP a_total Things\n# TYPE a_total counter\na_total{k=\"v\",q=\"x\\\"y\"} 3\nb_bucket{le=\"+Inf\"} 2\nc 1.5\n",
    );
    assert_eq!(e.types["a_total"], "counter");
    assert_eq!(e.value("a_total", &[("q", "x\"y")]), Some(3.0));
    assert_eq!(e.find("b_bucket", &[("le", "+Inf")]).len(), 1);
    assert_eq!(e.value("c", &[]), Some(1.5));
}

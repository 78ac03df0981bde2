//! A reader of the Prometheus text exposition format (version 0.0.4), strict enough that a scrape it reads is
//! one Prometheus reads: every line a comment, a `# HELP`/`# TYPE` line or a sample, names and labels well
//! formed, values numbers, a sample's family typed before it.

use std::collections::{BTreeMap, HashMap};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric's name, with its suffix (`_total`, `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A scrape read.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Each family's type, by name.
    pub types: HashMap<String, String>,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`, if exactly one has them.
    ///
    /// # Panics
    /// When several samples match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self
            .samples
            .iter()
            .filter(|sample| {
                sample.name == name
                    && labels.iter().all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
            })
            .collect();
        assert!(found.len() <= 1, "{} samples of {name} with {labels:?}: {found:?}", found.len());
        found.first().map(|sample| sample.value)
    }
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    is_name(name) && !name.contains(':')
}

fn value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        other => other.parse().map_err(|_| format!("`{other}` is not a number")),
    }
}

/// The family a sample belongs to: its name less a histogram's or summary's suffix.
fn family<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|kind| kind == "histogram" || kind == "summary")
        {
            return base;
        }
    }
    name
}

/// Reads a scrape.
///
/// # Errors
/// The first line that is not well formed, with why.
pub fn parse(text: &str) -> Result<Scrape, String> {
    let mut scrape = Scrape::default();
    for (number, line) in text.lines().enumerate() {
        let fail = |why: String| format!("line {}: {why}: {line:?}", number + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_name(name) {
                        return Err(fail("a bad metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind.trim()) {
                        return Err(fail(format!("an unknown type `{kind}`")));
                    }
                    if scrape.types.insert(name.to_owned(), kind.trim().to_owned()).is_some() {
                        return Err(fail("a family typed twice".into()));
                    }
                }
                (Some("HELP"), Some(name), _) if !is_name(name) => return Err(fail("a bad metric name".into())),
                _ => {}
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => return Err(fail("a sample without a value".into())),
        };
        if !is_name(name) {
            return Err(fail("a bad metric name".into()));
        }
        let mut labels = BTreeMap::new();
        let rest = if let Some(inside) = rest.strip_prefix('{') {
            let mut chars = inside.char_indices().peekable();
            let end = loop {
                let Some(&(start, c)) = chars.peek() else { return Err(fail("unclosed labels".into())) };
                if c == '}' {
                    break start;
                }
                if c == ',' {
                    chars.next();
                    continue;
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if !is_label_name(&key) {
                    return Err(fail(format!("a bad label name `{key}`")));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(fail("a label value without quotes".into()));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => return Err(fail("a bad escape in a label value".into())),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => return Err(fail("an unclosed label value".into())),
                    }
                }
                if labels.insert(key, value).is_some() {
                    return Err(fail("a label given twice".into()));
                }
            };
            &inside[end + 1..]
        } else {
            rest
        };
        let mut fields = rest.split_whitespace();
        let sample_value =
            value(fields.next().ok_or_else(|| fail("a sample without a value".into()))?).map_err(fail)?;
        if let Some(timestamp) = fields.next() {
            timestamp.parse::<i64>().map_err(|_| fail("a bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(fail("text after the timestamp".into()));
        }
        let base = family(name, &scrape.types);
        if !scrape.types.contains_key(base) {
            return Err(fail(format!("a sample of `{base}`, which has no TYPE line before it")));
        }
        scrape.samples.push(Sample { name: name.to_owned(), labels, value: sample_value });
    }
    Ok(scrape)
}

/// `GET /metrics` from `address`, over HTTP/1.1; the body.
///
/// # Panics
/// When the request fails or the answer is not `200 OK`.
pub async fn scrape(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("the metrics endpoint accepts");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("the request is sent");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("the answer is read");
    let answer = String::from_utf8(answer).expect("the answer is UTF-8");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_reads_and_bad_lines_are_refused() {
        let text = "# HELP calls Calls.\n# TYPE calls counter\ncalls{service=\"a\\\"b\",method=\"m\"} 3\n\
                    # TYPE took histogram\ntook_bucket{le=\"+Inf\"} 2\ntook_sum 0.5\ntook_count 2\n";
        let scrape = parse(text).expect("reads");
        assert_eq!(scrape.value("calls", &[("service", "a\"b")]), Some(3.0));
        assert_eq!(scrape.value("took_count", &[]), Some(2.0));
        for bad in ["calls 1\n", "# TYPE x counter\nx{a=1} 1\n", "# TYPE x counter\nx one\n", "# TYPE 1x counter\n"] {
            assert!(parse(bad).is_err(), "{bad:?} was read");
        }
    }
}

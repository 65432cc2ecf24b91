//! Reading a Prometheus text-format scrape (what the service's `/metrics` answers).
//!
//! One parser for everyone who reads the service's counters: the load generator (its report is
//! the difference of two scrapes) and the tests (through `testkit::prom`). It is a crate of its
//! own, with no dependencies, because the load generator needs it at run time while testkit is
//! only ever a dev-dependency.
//!
//! It reads samples only, which is all its users need: `# HELP`/`# TYPE` lines and blank lines
//! are skipped, and so is any line that is not `name[{labels}] value [timestamp]`. Label values
//! may hold spaces, braces and escaped quotes; the label set is skipped quote-aware.

/// One sample line of a scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// The metric name (for a histogram, the `_bucket`/`_sum`/`_count` series name).
    pub name: &'a str,
    /// The label set as written, braces included (`{shard="0"}`), or `""` when it has none.
    pub labels: &'a str,
    pub value: f64,
}

/// Every sample of `text`, in order.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (name, labels, value) = split_sample(line)?;
        Some(Sample {
            name,
            labels,
            value: value.parse().ok()?,
        })
    })
}

/// The sum of every sample of metric `name` (any labels), or `None` if there is none: a counter
/// with labels has no series at all until it is first incremented.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    samples(text)
        .filter(|s| s.name == name)
        .fold(None, |total, s| Some(total.unwrap_or(0.0) + s.value))
}

/// The sum of every sample of metric `name`, 0 if there is none (a counter not yet counted).
pub fn sum_metric(text: &str, name: &str) -> f64 {
    sum(text, name).unwrap_or(0.0)
}

/// Every series of metric `name`: its label set as written (`{shard="0"}`, or empty) and value.
pub fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    samples(text)
        .filter(|s| s.name == name)
        .map(|s| (s.labels.to_owned(), s.value))
        .collect()
}

/// Splits `name{labels} value [timestamp]` into the name, the label set (braces included, or
/// empty) and the value.
fn split_sample(line: &str) -> Option<(&str, &str, &str)> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = "";
    if rest.starts_with('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        (labels, rest) = rest.split_at(close? + 1);
    }
    let value = rest.split_whitespace().next()?;
    Some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP http_request_total requests
# TYPE http_request_total counter
http_request_total{endpoint="/template-details",method="GET",status="200"} 7300
http_request_total{endpoint="/template-details",method="GET",status="503"} 2
http_request_total{endpoint="we{ird} \"x\" y",method="GET",status="404"} 1 1700000000000
http_request_total_extra 99
cache_hits_total 7000

  db_hits_total 220
key_owner_inflight_keys{shard="0"} 3
key_owner_inflight_keys{shard="1"} 0
not a sample
broken{unclosed="x 5
"#;

    #[test]
    fn sums_every_label_set_and_nothing_else() {
        assert_eq!(sum(SCRAPE, "http_request_total"), Some(7303.0));
        assert_eq!(sum(SCRAPE, "http_request_total_extra"), Some(99.0));
        assert_eq!(sum(SCRAPE, "db_hits_total"), Some(220.0));
        assert_eq!(sum(SCRAPE, "no_such_metric"), None);
        assert_eq!(
            sum(SCRAPE, "broken"),
            None,
            "an unclosed label set is no sample"
        );
        assert_eq!(sum_metric(SCRAPE, "no_such_metric"), 0.0);
        assert_eq!(sum_metric(SCRAPE, "cache_hits_total"), 7000.0);
    }

    #[test]
    fn a_series_keeps_its_labels_as_written_and_a_timestamp_is_not_its_value() {
        assert_eq!(
            series(SCRAPE, "key_owner_inflight_keys"),
            vec![
                (r#"{shard="0"}"#.to_owned(), 3.0),
                (r#"{shard="1"}"#.to_owned(), 0.0)
            ]
        );
        assert_eq!(
            series(SCRAPE, "cache_hits_total"),
            vec![(String::new(), 7000.0)]
        );
        let weird = series(SCRAPE, "http_request_total");
        assert_eq!(
            weird[2],
            (
                r#"{endpoint="we{ird} \"x\" y",method="GET",status="404"}"#.to_owned(),
                1.0
            )
        );
    }

    #[test]
    fn special_values_parse() {
        let text = "a_bucket{le=\"+Inf\"} +Inf\nb NaN\nc -1.5e3\n";
        let all: Vec<Sample> = samples(text).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].labels, r#"{le="+Inf"}"#);
        assert!(all[0].value.is_infinite());
        assert!(all[1].value.is_nan());
        assert_eq!(all[2].value, -1500.0);
    }
}

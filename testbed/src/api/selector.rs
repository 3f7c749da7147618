//! Label and field selectors as `?labelSelector=` / `?fieldSelector=` carry them.
//!
//! Label selectors take the full syntax (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
//! `a notin (x,y)`, `a>1`, `a<1`). Field selectors take `f=v`, `f==v` and `f!=v` over the
//! fields each resource supports; an unknown field answers 400 as the real API does, so a
//! client that would fail against a cluster fails here too.

use std::collections::BTreeMap;

use super::status::ApiError;

#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

#[derive(Debug, Clone)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_label_requirement(part)?);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        self.requirements.iter().all(|r| match r {
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::NotExists(k) => get(k).is_none(),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|v| vs.contains(v)),
            LabelRequirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.contains(v)),
            LabelRequirement::Gt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            LabelRequirement::Lt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        })
    }
}

/// Splits on commas that are not inside `( )`.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn bad_label(part: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: {why} in label selector \"{part}\""
    ))
}

fn parse_label_requirement(part: &str) -> Result<LabelRequirement, ApiError> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(label_key(key.trim(), part)?));
    }
    for (op, neg) in [(" notin ", true), (" in ", false)] {
        if let Some(idx) = part.find(op) {
            let key = label_key(part[..idx].trim(), part)?;
            let rest = part[idx + op.len()..].trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| bad_label(part, "expected a parenthesised value list"))?;
            let values: Vec<String> = inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            return Ok(if neg {
                LabelRequirement::NotIn(key, values)
            } else {
                LabelRequirement::In(key, values)
            });
        }
    }
    for (op, kind) in [("!=", 0), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
        if let Some(idx) = part.find(op) {
            let key = label_key(part[..idx].trim(), part)?;
            let value = part[idx + op.len()..].trim().to_string();
            return match kind {
                0 => Ok(LabelRequirement::NotIn(key, vec![value])),
                1 => Ok(LabelRequirement::In(key, vec![value])),
                _ => {
                    let n = value.parse::<i64>().map_err(|_| {
                        bad_label(
                            part,
                            "for 'gt', 'lt' operators, the value must be an integer",
                        )
                    })?;
                    Ok(if kind == 2 {
                        LabelRequirement::Gt(key, n)
                    } else {
                        LabelRequirement::Lt(key, n)
                    })
                }
            };
        }
    }
    Ok(LabelRequirement::Exists(label_key(part, part)?))
}

fn label_key(key: &str, part: &str) -> Result<String, ApiError> {
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(bad_label(part, "invalid label key"));
    }
    Ok(key.to_string())
}

/// A parsed field selector: `(field, value, equal?)` terms, all of which must hold.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    terms: Vec<(String, String, bool)>,
}

impl FieldSelector {
    /// Parses `text`, rejecting fields outside `supported` the way the apiserver does.
    pub fn parse(text: &str, supported: &[&str], kind: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field} (for {kind})"
                )));
            }
            terms.push((field.to_string(), value.trim().to_string(), equal));
        }
        Ok(Self { terms })
    }

    /// `lookup` gives the value of a supported field for the object ("" when absent).
    pub fn matches(&self, lookup: impl Fn(&str) -> String) -> bool {
        self.terms
            .iter()
            .all(|(field, value, equal)| (lookup(field) == *value) == *equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_syntax() {
        let l = labels(&[("role", "worker"), ("zone", "a"), ("n", "5")]);
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(Some(&l));
        assert!(m(""));
        assert!(m("role=worker"));
        assert!(m("role==worker,zone"));
        assert!(!m("role!=worker"));
        assert!(m("!missing"));
        assert!(!m("!zone"));
        assert!(m("zone in (a, b)"));
        assert!(!m("zone notin (a,b)"));
        assert!(m("missing notin (a)"));
        assert!(m("n>4,n<6"));
        assert!(LabelSelector::parse("n>x").is_err());
        assert!(!LabelSelector::parse("role").unwrap().matches(None));
    }

    #[test]
    fn field_selector_rejects_unknown_fields() {
        let f = FieldSelector::parse("metadata.name=a", &["metadata.name"], "Node").unwrap();
        assert!(f.matches(|_| "a".into()));
        assert!(!f.matches(|_| "b".into()));
        let f = FieldSelector::parse("metadata.name!=a", &["metadata.name"], "Node").unwrap();
        assert!(f.matches(|_| "b".into()));
        let err = FieldSelector::parse("spec.foo=a", &["metadata.name"], "Node").unwrap_err();
        assert_eq!(err.code, 400);
    }
}

//! What kube-apiserver does with a CustomResourceDefinition's structural schema when a
//! custom resource is written or read: prune unknown fields, apply `default`s, validate
//! (types, `enum`, `required`, bounds, lengths, `pattern`) with field paths and the
//! apiserver's wording, so that kubectl prints the same errors as against a real cluster.

use serde_json::{Map, Value, json};

/// One field error, as a `StatusCause`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueRequired`, `FieldValueTypeInvalid`.
    pub reason: &'static str,
    /// `spec.strategy`, `spec.template.spec.containers[0].name`.
    pub field: String,
    /// The message after the field (`Unsupported value: "x": supported values: "a", "b"`).
    pub message: String,
}

impl FieldError {
    /// The cause object of a `Status`.
    pub fn cause(&self) -> Value {
        json!({"reason": self.reason, "message": self.message, "field": self.field})
    }
    /// `field: message`, as in the Status message.
    pub fn line(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn int_or_string(schema: &Value) -> bool {
    schema["x-kubernetes-int-or-string"].as_bool() == Some(true)
}

fn preserves_unknown(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true)
}

/// Go's `%v`-like rendering of a value in messages.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(expected: &str, v: &Value) -> bool {
    match (expected, v) {
        ("object", Value::Object(_))
        | ("array", Value::Array(_))
        | ("string", Value::String(_))
        | ("boolean", Value::Bool(_))
        | ("number", Value::Number(_)) => true,
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

/// Removes fields the schema does not declare (and `null`s of non-nullable fields, which
/// the apiserver drops before defaulting); returns the paths removed. At the root,
/// `apiVersion`, `kind` and `metadata` always stay.
pub fn prune(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut removed = Vec::new();
    prune_at(schema, obj, "", true, &mut removed);
    removed
}

fn prune_at(schema: &Value, v: &mut Value, path: &str, root: bool, removed: &mut Vec<String>) {
    if preserves_unknown(schema) && schema["properties"].is_null() {
        return;
    }
    match v {
        Value::Object(map) => {
            let props = schema["properties"].as_object();
            let additional = &schema["additionalProperties"];
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = props
                    .and_then(|p| p.get(&key))
                    .or(additional.is_object().then_some(additional));
                let field = join(path, &key);
                match sub {
                    Some(sub) => {
                        let is_null = map.get(&key).is_some_and(Value::is_null);
                        if is_null && sub["nullable"].as_bool() != Some(true) {
                            map.remove(&key);
                        } else if let Some(child) = map.get_mut(&key) {
                            prune_at(sub, child, &field, false, removed);
                        }
                    }
                    None if additional.as_bool() == Some(true) || preserves_unknown(schema) => {}
                    None => {
                        map.remove(&key);
                        removed.push(field);
                    }
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter_mut().enumerate() {
                prune_at(
                    &schema["items"],
                    item,
                    &format!("{path}[{i}]"),
                    false,
                    removed,
                );
            }
        }
        _ => {}
    }
}

/// The fields of `obj` the schema does not declare (what `fieldValidation=Strict` rejects
/// and `Warn` reports), without changing `obj`.
pub fn unknown_fields(schema: &Value, obj: &Value) -> Vec<String> {
    let mut copy = obj.clone();
    prune(schema, &mut copy)
}

/// Sets every missing field that has a `default` (recursively, inside objects that exist).
pub fn apply_defaults(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(props) = schema["properties"].as_object() {
                for (key, sub) in props {
                    if !map.contains_key(key)
                        && let Some(d) = sub.get("default")
                    {
                        map.insert(key.clone(), d.clone());
                    }
                    if let Some(child) = map.get_mut(key) {
                        apply_defaults(sub, child);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for child in map.values_mut() {
                    apply_defaults(&schema["additionalProperties"], child);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for item in items {
                apply_defaults(&schema["items"], item);
            }
        }
        _ => {}
    }
}

/// Validates `obj` against the schema; empty when valid. The root's `metadata` is left
/// to the object-meta rules.
pub fn validate(schema: &Value, obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    validate_at(schema, obj, "", true, &mut errors);
    errors
}

fn validate_at(schema: &Value, v: &Value, path: &str, root: bool, errors: &mut Vec<FieldError>) {
    if v.is_null() {
        if schema["nullable"].as_bool() != Some(true) && !schema["type"].is_null() {
            errors.push(FieldError {
                reason: "FieldValueTypeInvalid",
                field: path.to_owned(),
                message: format!(
                    "Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                    schema["type"].as_str().unwrap_or("object")
                ),
            });
        }
        return;
    }
    if int_or_string(schema) {
        if !(type_matches("integer", v) || v.is_string()) {
            errors.push(FieldError {
                reason: "FieldValueTypeInvalid",
                field: path.to_owned(),
                message: format!(
                    "Invalid value: \"{t}\": {path} in body must be of type integer,string: \"{t}\"",
                    t = type_name(v)
                ),
            });
        }
        return;
    }
    if let Some(expected) = schema["type"].as_str()
        && !type_matches(expected, v)
    {
        errors.push(FieldError {
            reason: "FieldValueTypeInvalid",
            field: path.to_owned(),
            message: format!(
                "Invalid value: \"{t}\": {path} in body must be of type {expected}: \"{t}\"",
                t = type_name(v)
            ),
        });
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(render).collect();
        errors.push(FieldError {
            reason: "FieldValueNotSupported",
            field: path.to_owned(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                render(v),
                list.join(", ")
            ),
        });
    }
    let invalid = |message: String| FieldError {
        reason: "FieldValueInvalid",
        field: path.to_owned(),
        message: format!("Invalid value: {}: {path} in body {message}", render(v)),
    };
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema["minimum"].as_f64() {
            let exclusive = schema["exclusiveMinimum"].as_bool() == Some(true);
            if n < min || (exclusive && n == min) {
                let op = if exclusive {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                errors.push(invalid(format!("should be {op} {}", number(min))));
            }
        }
        if let Some(max) = schema["maximum"].as_f64() {
            let exclusive = schema["exclusiveMaximum"].as_bool() == Some(true);
            if n > max || (exclusive && n == max) {
                let op = if exclusive {
                    "less than"
                } else {
                    "less than or equal to"
                };
                errors.push(invalid(format!("should be {op} {}", number(max))));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema["minLength"].as_u64()
            && len < min
        {
            errors.push(invalid(format!("should be at least {min} chars long")));
        }
        if let Some(max) = schema["maxLength"].as_u64()
            && len > max
        {
            errors.push(invalid(format!("may not be longer than {max}")));
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && !matches_pattern(pattern, s)
        {
            errors.push(invalid(format!("should match '{pattern}'")));
        }
    }
    match v {
        Value::Object(map) => validate_object(schema, map, path, root, errors),
        Value::Array(items) => {
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errors.push(invalid(format!("should have at least {min} items")));
            }
            if let Some(max) = schema["maxItems"].as_u64()
                && (items.len() as u64) > max
            {
                errors.push(FieldError {
                    reason: "FieldValueTooMany",
                    field: path.to_owned(),
                    message: format!("Too many: {}: must have at most {max} items", items.len()),
                });
            }
            if schema["items"].is_object() {
                for (i, item) in items.iter().enumerate() {
                    validate_at(
                        &schema["items"],
                        item,
                        &format!("{path}[{i}]"),
                        false,
                        errors,
                    );
                }
            }
        }
        _ => {}
    }
}

fn validate_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    root: bool,
    errors: &mut Vec<FieldError>,
) {
    if let Some(required) = schema["required"].as_array() {
        for key in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(key) {
                errors.push(FieldError {
                    reason: "FieldValueRequired",
                    field: join(path, key),
                    message: "Required value".into(),
                });
            }
        }
    }
    let props = schema["properties"].as_object();
    for (key, child) in map {
        if root && key == "metadata" {
            continue;
        }
        let sub = props.and_then(|p| p.get(key)).or_else(|| {
            let a = &schema["additionalProperties"];
            a.is_object().then_some(a)
        });
        if let Some(sub) = sub {
            validate_at(sub, child, &join(path, key), false, errors);
        }
    }
}

/// `1` rather than `1.0` for whole numbers, as Go prints them.
fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// ECMA-262 patterns as Kubernetes schemas use them (the `regex` crate agrees on that
/// subset); a pattern it cannot compile matches everything, as the CRD was accepted.
fn matches_pattern(pattern: &str, s: &str) -> bool {
    regex::Regex::new(pattern).map_or(true, |re| re.is_match(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["podName"], "properties": {
                "podName": {"type": "string", "minLength": 1, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "strategy": {"type": "string", "enum": ["full", "lazy"], "default": "full"},
                "timeoutSeconds": {"type": "integer", "minimum": 1.0, "default": 300},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "ports": {"type": "array", "items": {"type": "object", "properties": {
                    "port": {"x-kubernetes-int-or-string": true}}}},
                "targetNode": {"type": "string", "nullable": true}}}}})
    }

    #[test]
    fn reports_each_violation_with_the_apiservers_wording() {
        let obj = json!({"spec": {"strategy": "teleport", "timeoutSeconds": "abc", "ports": [{"port": true}]}});
        let lines: Vec<String> = validate(&schema(), &obj)
            .iter()
            .map(FieldError::line)
            .collect();
        assert_eq!(
            lines,
            vec![
                "spec.podName: Required value".to_owned(),
                "spec.ports[0].port: Invalid value: \"boolean\": spec.ports[0].port in body must be of type integer,string: \"boolean\"".to_owned(),
                "spec.strategy: Unsupported value: \"teleport\": supported values: \"full\", \"lazy\"".to_owned(),
                "spec.timeoutSeconds: Invalid value: \"string\": spec.timeoutSeconds in body must be of type integer: \"string\"".to_owned(),
            ]
        );
        let obj = json!({"spec": {"podName": "", "timeoutSeconds": 0}});
        let lines: Vec<String> = validate(&schema(), &obj)
            .iter()
            .map(FieldError::line)
            .collect();
        assert_eq!(
            lines,
            vec![
                "spec.podName: Invalid value: \"\": spec.podName in body should be at least 1 chars long".to_owned(),
                "spec.podName: Invalid value: \"\": spec.podName in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'".to_owned(),
                "spec.timeoutSeconds: Invalid value: 0: spec.timeoutSeconds in body should be greater than or equal to 1".to_owned(),
            ]
        );
        assert!(
            validate(
                &schema(),
                &json!({"spec": {"podName": "counter-0", "targetNode": null}})
            )
            .is_empty()
        );
        assert!(!validate(&schema(), &json!({"spec": {"podName": "Counter"}})).is_empty());
    }

    #[test]
    fn prunes_unknown_fields_and_applies_defaults() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a", "extra": 1},
            "spec": {"podName": "a", "bogus": 1, "labels": {"a": "b"}, "strategy": null}, "other": {}});
        assert_eq!(
            prune(&schema(), &mut obj),
            vec!["other".to_owned(), "spec.bogus".to_owned()]
        );
        apply_defaults(&schema(), &mut obj);
        assert_eq!(
            obj,
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a", "extra": 1},
                "spec": {"podName": "a", "labels": {"a": "b"}, "strategy": "full", "timeoutSeconds": 300}})
        );
    }
}

//! Values of Celery's `broker_transport_options`, read as kombu takes them: the map is pasted
//! from the Celery app (through TOML or JSON), so each value is checked for the type kombu
//! expects, with an error naming its field (`source.broker_transport_options.sep`).

use serde_json::Value;

use crate::ConfigError;

/// A string option.
pub fn string(field: &str, v: &Value) -> Result<String, ConfigError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(ConfigError::new(field, "must be a string")),
    }
}

/// A number of seconds, 0 or more: kombu takes an int or a float, and py-amqp a numeric string
/// (`float()`).
pub fn seconds(field: &str, v: &Value) -> Result<f64, ConfigError> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    n.filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| ConfigError::new(field, "must be a number of seconds (0 or more)"))
}

/// Python's truthiness of a value (kombu tests options with `if self.fanout_patterns:`).
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A flag: `true`/`false`, or a number or null read as Python would.
pub fn boolean(field: &str, v: &Value) -> Result<bool, ConfigError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(_) | Value::Null => Ok(truthy(v)),
        _ => Err(ConfigError::new(
            field,
            "must be true or false (Python True/False)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_read_as_python_reads_them() {
        assert_eq!(string("f", &json!("acme:")).unwrap(), "acme:");
        assert_eq!(string("f", &json!(1)).unwrap_err().field, "f");
        assert_eq!(seconds("f", &json!("2.5")).unwrap(), 2.5);
        assert!(seconds("f", &json!(-1)).is_err());
        assert!(seconds("f", &json!(f64::MAX)).is_ok());
        assert!(!truthy(&json!([])) && truthy(&json!({"a": 1})) && !truthy(&json!(0.0)));
        assert!(boolean("f", &json!(1)).unwrap());
        assert!(boolean("f", &json!("yes")).is_err());
    }
}

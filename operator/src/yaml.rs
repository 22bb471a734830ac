//! YAML out: the CRD and the egress selector configuration.

use serde::Serialize;

/// Why a value could not be written as YAML.
pub type Error = serde_saphyr::ser::Error;

/// `value` as YAML, long strings kept on one line (quoted where needed) rather than folded, so
/// that generated files read and diff like what `kubectl get -o yaml` prints.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, Error> {
    let options = serde_saphyr::ser_options! {
        prefer_block_scalars: false,
    };
    serde_saphyr::to_string_with_options(value, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_and_multiline_strings_stay_scalars_and_read_back() {
        let long = "word ".repeat(40);
        let value = serde_json::json!({"long": long, "lines": "a\n\tb\n", "empty": {}});
        let text = to_string(&value).unwrap();
        assert!(!text.contains(": >") && !text.contains(": |"), "{text}");
        let back: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, value);
    }
}

//! RFC 7512 PKCS#11 URIs naming the controller key in a token, e.g.
//! `pkcs11:token=robot;object=controller?module-path=/usr/lib/softhsm/libsofthsm2.so`.
//!
//! Parsed whatever the build's features, so that a configuration naming a
//! token is checked (and refused clearly) even by an agent built without
//! the PKCS#11 backend. Attributes the agent does not act on are refused
//! rather than ignored: a typo must not select another key.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Why a string is not a usable PKCS#11 URI. Never carries a PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("a PKCS#11 URI starts with `pkcs11:`")]
    Scheme,
    #[error("attribute `{attribute}` has a bad percent-escape (use %XX with two hex digits)")]
    Escape { attribute: String },
    #[error("`{attribute}` is not `name=value`")]
    NotPair { attribute: String },
    #[error(
        "unknown attribute `{attribute}` (known: token, manufacturer, serial, model, slot-id, \
         object, id, type; ?module-path, pin-source)"
    )]
    Unknown { attribute: String },
    #[error("attribute `{attribute}` is given twice")]
    Duplicate { attribute: String },
    #[error("`{attribute}` must be UTF-8 text")]
    NotText { attribute: String },
    #[error(
        "pin-value would put the PIN in the configuration; put it in a file (mode 0600) or a \
         systemd credential and name that with pin-source or [identity] key_pin_file"
    )]
    PinValue,
    #[error(
        "the URI names no module: add ?module-path=/path/to/the/pkcs11/module.so \
         (e.g. /usr/lib/softhsm/libsofthsm2.so)"
    )]
    NoModule,
    #[error(
        "module-name is not supported; name the module file with module-path \
         (an absolute path)"
    )]
    ModuleName,
    #[error("module-path must be an absolute path")]
    RelativeModule,
    #[error("the URI names no key: add object=LABEL or id=%XX..")]
    NoObject,
    #[error("type must be `private` (the controller key), not {value:?}")]
    Type { value: String },
    #[error("slot-id must be a decimal number, not {value:?}")]
    SlotId { value: String },
}

/// A parsed PKCS#11 URI: which module, which token, which key, and where the
/// PIN is (a file path, `file:` URI or `credential:NAME`).
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub module_path: PathBuf,
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    /// CKA_LABEL of the key objects.
    pub object: Option<String>,
    /// CKA_ID of the key objects.
    pub id: Option<Vec<u8>>,
    /// Where the user PIN is read from, as the config names it.
    pub pin_source: Option<String>,
    text: String,
}

impl Pkcs11Uri {
    /// The URI as written (it holds no secret: `pin-value` is refused).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `pin-source` as a location `secrets::resolve` understands: a path or
    /// `credential:NAME` (a `file:` URI becomes its path).
    pub fn pin_location(&self) -> Option<String> {
        self.pin_source.as_ref().map(|s| {
            s.strip_prefix("file://")
                .or_else(|| s.strip_prefix("file:"))
                .unwrap_or(s)
                .to_owned()
        })
    }

    /// How the key is named, for messages: `object "controller"`, `id 01`.
    pub fn key_name(&self) -> String {
        match (&self.object, &self.id) {
            (Some(label), Some(id)) => format!("object {label:?} (id {})", hex(id)),
            (Some(label), None) => format!("object {label:?}"),
            (None, Some(id)) => format!("id {}", hex(id)),
            (None, None) => "no object".to_owned(),
        }
    }

    /// How the token is named, for messages.
    pub fn token_name(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token {t:?}"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s:?}"));
        }
        if let Some(m) = &self.manufacturer {
            parts.push(format!("manufacturer {m:?}"));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model {m:?}"));
        }
        if let Some(id) = self.slot_id {
            parts.push(format!("slot-id {id}"));
        }
        if parts.is_empty() {
            "the first token".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

impl Pkcs11Uri {
    /// The URI of a new key pair beside this one on the same token (key
    /// rotation's successor): the same token, module and PIN, the object
    /// `id` (as given) and a label derived from this one's (`LABEL-next-ID`).
    pub fn sibling(&self, id: &[u8]) -> Result<Self, UriError> {
        let rest = &self.text[7..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut items: Vec<String> = path
            .split(';')
            .filter(|s| !s.is_empty() && !s.starts_with("object=") && !s.starts_with("id="))
            .map(str::to_owned)
            .collect();
        let label = path
            .split(';')
            .find_map(|s| s.strip_prefix("object="))
            .unwrap_or("controller");
        let id_hex = hex(id);
        items.push(format!("object={label}-next-{id_hex}"));
        items.push(format!(
            "id=%{}",
            id_hex
                .as_bytes()
                .chunks(2)
                .map(|p| std::str::from_utf8(p).unwrap_or(""))
                .collect::<Vec<_>>()
                .join("%")
        ));
        let mut text = format!("pkcs11:{}", items.join(";"));
        if !query.is_empty() {
            text.push('?');
            text.push_str(query);
        }
        text.parse()
    }
}

/// Lowercase hex of an object id.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({})", self.text)
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn decode(attribute: &str, value: &str) -> Result<Vec<u8>, UriError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UriError::Escape {
                    attribute: attribute.to_owned(),
                })?;
            out.push(pair);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(attribute: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(decode(attribute, value)?).map_err(|_| UriError::NotText {
        attribute: attribute.to_owned(),
    })
}

fn set<T>(slot: &mut Option<T>, attribute: &str, value: T) -> Result<(), UriError> {
    if slot.is_some() {
        return Err(UriError::Duplicate {
            attribute: attribute.to_owned(),
        });
    }
    *slot = Some(value);
    Ok(())
}

fn split_pair(item: &str) -> Result<(&str, &str), UriError> {
    item.split_once('=').ok_or_else(|| UriError::NotPair {
        attribute: item.to_owned(),
    })
}

impl FromStr for Pkcs11Uri {
    type Err = UriError;

    fn from_str(input: &str) -> Result<Self, UriError> {
        let rest = input
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("pkcs11:"))
            .map(|_| &input[7..])
            .ok_or(UriError::Scheme)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Self {
            module_path: PathBuf::new(),
            token: None,
            manufacturer: None,
            serial: None,
            model: None,
            slot_id: None,
            object: None,
            id: None,
            pin_source: None,
            text: input.to_owned(),
        };
        let mut object_type = None;
        for item in path.split(';').filter(|s| !s.is_empty()) {
            let (name, value) = split_pair(item)?;
            match name {
                "token" => set(&mut uri.token, name, text(name, value)?)?,
                "manufacturer" => set(&mut uri.manufacturer, name, text(name, value)?)?,
                "serial" => set(&mut uri.serial, name, text(name, value)?)?,
                "model" => set(&mut uri.model, name, text(name, value)?)?,
                "object" => set(&mut uri.object, name, text(name, value)?)?,
                "id" => set(&mut uri.id, name, decode(name, value)?)?,
                "type" => set(&mut object_type, name, text(name, value)?)?,
                "slot-id" => {
                    let value = text(name, value)?;
                    let id = value.parse().map_err(|_| UriError::SlotId {
                        value: value.clone(),
                    })?;
                    set(&mut uri.slot_id, name, id)?;
                }
                _ => {
                    return Err(UriError::Unknown {
                        attribute: name.to_owned(),
                    });
                }
            }
        }
        let mut module = None;
        for item in query.split('&').filter(|s| !s.is_empty()) {
            let (name, value) = split_pair(item)?;
            match name {
                "module-path" => set(&mut module, name, text(name, value)?)?,
                "pin-source" => set(&mut uri.pin_source, name, text(name, value)?)?,
                "pin-value" => return Err(UriError::PinValue),
                "module-name" => return Err(UriError::ModuleName),
                _ => {
                    return Err(UriError::Unknown {
                        attribute: name.to_owned(),
                    });
                }
            }
        }
        if let Some(t) = object_type
            && t != "private"
        {
            return Err(UriError::Type { value: t });
        }
        let module = module.ok_or(UriError::NoModule)?;
        if !module.starts_with('/') {
            return Err(UriError::RelativeModule);
        }
        uri.module_path = PathBuf::from(module);
        if uri.object.is_none() && uri.id.is_none() {
            return Err(UriError::NoObject);
        }
        Ok(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOFTHSM: &str = "module-path=/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn parses_the_documented_form_with_escapes() {
        let uri: Pkcs11Uri = format!(
            "pkcs11:token=robot%20one;object=controller;id=%01%ff;type=private?{SOFTHSM}\
             &pin-source=file:/run/pin"
        )
        .parse()
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("robot one"));
        assert_eq!(uri.object.as_deref(), Some("controller"));
        assert_eq!(uri.id.as_deref(), Some(&[0x01, 0xff][..]));
        assert_eq!(
            uri.module_path,
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(uri.pin_location().as_deref(), Some("/run/pin"));
        assert_eq!(uri.key_name(), "object \"controller\" (id 01ff)");
        let cred: Pkcs11Uri = format!("pkcs11:object=k?{SOFTHSM}&pin-source=credential:pin")
            .parse()
            .unwrap();
        assert_eq!(cred.pin_location().as_deref(), Some("credential:pin"));
        assert_eq!(cred.token_name(), "the first token");
    }

    #[test]
    fn every_mistake_is_named() {
        let cases = [
            ("token=robot;object=k", UriError::Scheme),
            ("pkcs11:object=k", UriError::NoModule),
            (&format!("pkcs11:token=robot?{SOFTHSM}"), UriError::NoObject),
            (
                &format!("pkcs11:object=k;objekt=x?{SOFTHSM}"),
                UriError::Unknown {
                    attribute: "objekt".into(),
                },
            ),
            (
                &format!("pkcs11:object=k;object=j?{SOFTHSM}"),
                UriError::Duplicate {
                    attribute: "object".into(),
                },
            ),
            (
                &format!("pkcs11:object=k?{SOFTHSM}&pin-value=1234"),
                UriError::PinValue,
            ),
            (
                "pkcs11:object=k?module-path=libsofthsm2.so",
                UriError::RelativeModule,
            ),
            ("pkcs11:object=k?module-name=softhsm2", UriError::ModuleName),
            (
                &format!("pkcs11:object=k%2?{SOFTHSM}"),
                UriError::Escape {
                    attribute: "object".into(),
                },
            ),
            (
                &format!("pkcs11:object=k;type=public?{SOFTHSM}"),
                UriError::Type {
                    value: "public".into(),
                },
            ),
            (
                &format!("pkcs11:object=k;slot-id=x?{SOFTHSM}"),
                UriError::SlotId { value: "x".into() },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Pkcs11Uri>().unwrap_err(), want, "{input}");
        }
    }

    #[test]
    fn the_pin_never_shows() {
        let err = format!("pkcs11:object=k?{SOFTHSM}&pin-value=s3cret")
            .parse::<Pkcs11Uri>()
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("s3cret"));
    }

    #[test]
    fn a_sibling_is_on_the_same_token_with_a_derived_label_and_the_new_id() {
        let uri: Pkcs11Uri =
            "pkcs11:token=robot;object=dock%207;id=%01?module-path=/m.so&pin-source=/p"
                .parse()
                .unwrap();
        let sibling = uri.sibling(&[0xab, 0x01]).unwrap();
        assert_eq!(sibling.token.as_deref(), Some("robot"));
        assert_eq!(sibling.object.as_deref(), Some("dock 7-next-ab01"));
        assert_eq!(sibling.id.as_deref(), Some(&[0xab, 0x01][..]));
        assert_eq!(sibling.pin_source.as_deref(), Some("/p"));
        assert_eq!(sibling.module_path, uri.module_path);
    }
}

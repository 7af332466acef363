//! The serde deserializer the configuration's types are read with: toml's
//! parsed tables ([`DeTable`], spans included) handed to `Deserialize`, as
//! toml's own `Deserializer` does, with the same error spans and messages.
//!
//! Why not toml's: its `deserialize_any` hands every visitor a table as a
//! map, an array as a sequence and a datetime as a map of its own kind, so
//! each config struct's derived visitor is compiled three times (`visit_map`
//! twice, `visit_seq` once): the config's serde code was 148 KB of the
//! agent, for files read once at start, and is 72 KB with this
//! (docs/performance.md). Here a struct is only ever read from a table and
//! an enum only from a string (given anything else, either is refused with
//! serde's "invalid type" message), and a datetime, which no key takes, is
//! refused as toml refuses it where a string or a number is wanted.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, IntoDeserializer, Unexpected, Visitor};
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

/// A refusal and where it is: the span of the innermost key or value it is
/// about (in the text the tables were parsed from).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct Error {
    pub(super) message: String,
    pub(super) span: Option<Range<usize>>,
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            message: msg.to_string(),
            span: None,
        }
    }
}

/// An error without a span gets `span`: the value being read when it
/// happened (toml's rule, so that a missing field is reported at its table).
fn at<T>(result: Result<T, Error>, span: &Range<usize>) -> Result<T, Error> {
    result.map_err(|mut e| {
        if e.span.is_none() {
            e.span = Some(span.clone());
        }
        e
    })
}

/// One value and its span.
pub(super) struct Value<'i> {
    span: Range<usize>,
    value: DeValue<'i>,
}

impl<'i> Value<'i> {
    pub(super) fn table(root: Spanned<DeTable<'i>>) -> Self {
        let span = root.span();
        Self {
            span,
            value: DeValue::Table(root.into_inner()),
        }
    }

    fn new(value: Spanned<DeValue<'i>>) -> Self {
        Self {
            span: value.span(),
            value: value.into_inner(),
        }
    }

    /// What serde's default `visit_*` would name this value as, for a
    /// visitor that does not take it (a datetime is a map, as toml has it).
    fn unexpected(&self) -> Result<Unexpected<'_>, Error> {
        Ok(match &self.value {
            DeValue::String(s) => Unexpected::Str(s),
            DeValue::Integer(_) => match self.integer()? {
                Integer::Signed(v) => Unexpected::Signed(v),
                Integer::Unsigned(v) => Unexpected::Unsigned(v),
                Integer::Wide(_) | Integer::WideUnsigned(_) => Unexpected::Other("integer"),
            },
            DeValue::Float(_) => Unexpected::Float(self.float()?),
            DeValue::Boolean(v) => Unexpected::Bool(*v),
            DeValue::Datetime(_) | DeValue::Table(_) => Unexpected::Map,
            DeValue::Array(_) => Unexpected::Seq,
        })
    }

    /// serde's "invalid type" refusal of this value by `visitor`.
    fn refusal(&self, visitor: &dyn de::Expected) -> Error {
        match self.unexpected() {
            Ok(unexpected) => de::Error::invalid_type(unexpected, visitor),
            Err(e) => e,
        }
    }

    fn integer(&self) -> Result<Integer, Error> {
        let DeValue::Integer(v) = &self.value else {
            unreachable!("only called on integers")
        };
        let (text, radix) = (v.as_str(), v.radix());
        if let Ok(v) = i64::from_str_radix(text, radix) {
            Ok(Integer::Signed(v))
        } else if let Ok(v) = u64::from_str_radix(text, radix) {
            Ok(Integer::Unsigned(v))
        } else if let Ok(v) = i128::from_str_radix(text, radix) {
            Ok(Integer::Wide(v))
        } else if let Ok(v) = u128::from_str_radix(text, radix) {
            Ok(Integer::WideUnsigned(v))
        } else {
            Err(de::Error::custom("integer number overflowed"))
        }
    }

    fn float(&self) -> Result<f64, Error> {
        let DeValue::Float(v) = &self.value else {
            unreachable!("only called on floats")
        };
        match v.as_str().parse::<f64>() {
            Ok(f) if !f.is_infinite() || v.as_str().contains("inf") => Ok(f),
            _ => Err(de::Error::custom("floating-point number overflowed")),
        }
    }
}

enum Integer {
    Signed(i64),
    Unsigned(u64),
    /// Beyond `u64`: no config key takes one; refused by its visitor.
    Wide(i128),
    WideUnsigned(u128),
}

impl<'de> de::Deserializer<'de> for Value<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let span = self.span.clone();
        let result = match self.value {
            DeValue::String(Cow::Owned(v)) => visitor.visit_string(v),
            DeValue::String(Cow::Borrowed(v)) => visitor.visit_borrowed_str(v),
            DeValue::Integer(_) => match self.integer() {
                Ok(Integer::Signed(v)) => visitor.visit_i64(v),
                Ok(Integer::Unsigned(v)) => visitor.visit_u64(v),
                Ok(Integer::Wide(v)) => visitor.visit_i128(v),
                Ok(Integer::WideUnsigned(v)) => visitor.visit_u128(v),
                Err(e) => Err(e),
            },
            DeValue::Float(_) => self.float().and_then(|v| visitor.visit_f64(v)),
            DeValue::Boolean(v) => visitor.visit_bool(v),
            DeValue::Datetime(_) => Err(de::Error::invalid_type(Unexpected::Map, &visitor)),
            DeValue::Array(items) => visitor.visit_seq(Seq(items.into_iter())),
            DeValue::Table(table) => visitor.visit_map(Map {
                entries: table.into_iter(),
                value: None,
            }),
        };
        at(result, &span)
    }

    // A present key is `Some`; an absent one is `None` through the derived
    // visitor's `missing_field`.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let span = self.span.clone();
        at(visitor.visit_some(self), &span)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        let span = self.span.clone();
        at(visitor.visit_newtype_struct(self), &span)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let result = match self.value {
            DeValue::Table(table) => visitor.visit_map(Map {
                entries: table.into_iter(),
                value: None,
            }),
            _ => Err(self.refusal(&visitor)),
        };
        at(result, &self.span)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let result = match self.value {
            DeValue::String(v) => visitor.visit_enum(v.into_deserializer()),
            _ => Err(self.refusal(&visitor)),
        };
        at(result, &self.span)
    }

    serde::forward_to_deserialize_any! {
        bool u8 u16 u32 u64 u128 i8 i16 i32 i64 i128 f32 f64 char str string seq
        bytes byte_buf map unit ignored_any unit_struct tuple_struct tuple identifier
    }
}

/// A table's entries; each error in a key or value carries its span.
struct Map<'i> {
    entries: <DeTable<'i> as IntoIterator>::IntoIter,
    value: Option<Spanned<DeValue<'i>>>,
}

impl<'de> de::MapAccess<'de> for Map<'de> {
    type Error = Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let span = key.span();
        self.value = Some(value);
        let key: de::value::CowStrDeserializer<'de, Error> = key.into_inner().into_deserializer();
        at(seed.deserialize(key).map(Some), &span)
    }

    fn next_value_seed<S: de::DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
        let value = self
            .value
            .take()
            .expect("serde asks for a value after its key");
        let span = value.span();
        at(seed.deserialize(Value::new(value)), &span)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An array's items.
struct Seq<'i>(<DeArray<'i> as IntoIterator>::IntoIter);

impl<'de> de::SeqAccess<'de> for Seq<'de> {
    type Error = Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0
            .next()
            .map(|item| seed.deserialize(Value::new(item)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

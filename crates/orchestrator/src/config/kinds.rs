//! How each kind of setting is read: from its TOML value, and from its
//! environment variable's text. Every error message is the value's problem
//! alone; the caller prefixes the setting's name.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{VerificationMode, redact_password};

/// A kind of setting: the type it has in [`super::Config`], the type it has
/// in the file, and how both the file value and environment text become it.
pub(super) trait Kind {
    type Field: fmt::Debug;
    type File: DeserializeOwned;

    /// Whether the environment text is trimmed first.
    const TRIM: bool = true;

    fn from_file(value: Self::File) -> Result<Self::Field, String>;
    fn from_env(text: &str) -> Result<Self::Field, String>;

    /// How `Debug` shows the value (secrets hidden).
    fn show(value: &Self::Field, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(value, f)
    }
}

/// Shows a setting's value the way its kind says.
pub(super) struct Shown<'a, K: Kind + ?Sized>(pub(super) &'a K::Field);

impl<K: Kind + ?Sized> fmt::Debug for Shown<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        K::show(self.0, f)
    }
}

/// Unset unless given: the field is `Option` of the kind's.
impl<K: Kind> Kind for Option<K> {
    type Field = Option<K::Field>;
    type File = K::File;
    const TRIM: bool = K::TRIM;

    fn from_file(value: K::File) -> Result<Self::Field, String> {
        K::from_file(value).map(Some)
    }

    fn from_env(text: &str) -> Result<Self::Field, String> {
        K::from_env(text).map(Some)
    }

    fn show(value: &Self::Field, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match value {
            None => f.write_str("None"),
            Some(v) => f.debug_tuple("Some").field(&Shown::<K>(v)).finish(),
        }
    }
}

/// `address:port`.
#[derive(Debug)]
pub(super) enum Addr {}
impl Kind for Addr {
    type Field = SocketAddr;
    type File = String;
    fn from_file(value: String) -> Result<SocketAddr, String> {
        Self::from_env(&value)
    }
    fn from_env(text: &str) -> Result<SocketAddr, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address:port such as 127.0.0.1:8080"))
    }
}

/// Text, trimmed when it comes from the environment.
#[derive(Debug)]
pub(super) enum Text {}
impl Kind for Text {
    type Field = String;
    type File = String;
    fn from_file(value: String) -> Result<String, String> {
        Ok(value)
    }
    fn from_env(text: &str) -> Result<String, String> {
        Ok(text.to_owned())
    }
}

/// Text taken exactly as given (validation says what is wrong with it).
#[derive(Debug)]
pub(super) enum ExactText {}
impl Kind for ExactText {
    type Field = String;
    type File = String;
    const TRIM: bool = false;
    fn from_file(value: String) -> Result<String, String> {
        Ok(value)
    }
    fn from_env(text: &str) -> Result<String, String> {
        Ok(text.to_owned())
    }
}

/// A URL that may carry a password: `Debug` shows `***` instead.
#[derive(Debug)]
pub(super) enum SecretUrl {}
impl Kind for SecretUrl {
    type Field = String;
    type File = String;
    fn from_file(value: String) -> Result<String, String> {
        Ok(value)
    }
    fn from_env(text: &str) -> Result<String, String> {
        Ok(text.to_owned())
    }
    fn show(value: &String, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_password(value), f)
    }
}

#[derive(Debug)]
pub(super) enum File {}
impl Kind for File {
    type Field = PathBuf;
    type File = PathBuf;
    fn from_file(value: PathBuf) -> Result<PathBuf, String> {
        Ok(value)
    }
    fn from_env(text: &str) -> Result<PathBuf, String> {
        Ok(PathBuf::from(text))
    }
}

/// `true`/`false` (the environment also takes 1/0, yes/no, on/off).
#[derive(Debug)]
pub(super) enum Flag {}
impl Kind for Flag {
    type Field = bool;
    type File = bool;
    fn from_file(value: bool) -> Result<bool, String> {
        Ok(value)
    }
    fn from_env(text: &str) -> Result<bool, String> {
        match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("{text:?} is not true or false")),
        }
    }
}

/// A whole number of type `T`.
#[derive(Debug)]
pub(super) struct Num<T>(std::marker::PhantomData<T>);
impl<T: FromStr + DeserializeOwned + fmt::Debug> Kind for Num<T> {
    type Field = T;
    type File = T;
    fn from_file(value: T) -> Result<T, String> {
        Ok(value)
    }
    fn from_env(text: &str) -> Result<T, String> {
        parse_num(text)
    }
}

/// A size in bytes.
#[derive(Debug)]
pub(super) enum Bytes {}
impl Kind for Bytes {
    type Field = usize;
    type File = u64;
    fn from_file(value: u64) -> Result<usize, String> {
        usize::try_from(value).map_err(|_| "too large".to_owned())
    }
    fn from_env(text: &str) -> Result<usize, String> {
        parse_num(text)
    }
}

/// A duration in whole seconds.
#[derive(Debug)]
pub(super) enum Secs {}
impl Kind for Secs {
    type Field = Duration;
    type File = u64;
    fn from_file(value: u64) -> Result<Duration, String> {
        Ok(Duration::from_secs(value))
    }
    fn from_env(text: &str) -> Result<Duration, String> {
        parse_num(text).map(Duration::from_secs)
    }
}

/// A duration in whole milliseconds.
#[derive(Debug)]
pub(super) enum Millis {}
impl Kind for Millis {
    type Field = Duration;
    type File = u64;
    fn from_file(value: u64) -> Result<Duration, String> {
        Ok(Duration::from_millis(value))
    }
    fn from_env(text: &str) -> Result<Duration, String> {
        parse_num(text).map(Duration::from_millis)
    }
}

/// `required` or `disabled`.
#[derive(Debug)]
pub(super) enum Verification {}
impl Kind for Verification {
    type Field = VerificationMode;
    type File = String;
    fn from_file(value: String) -> Result<VerificationMode, String> {
        Self::from_env(&value)
    }
    fn from_env(text: &str) -> Result<VerificationMode, String> {
        match text.trim() {
            "required" => Ok(VerificationMode::Required),
            "disabled" => Ok(VerificationMode::Disabled),
            _ => Err(format!("{text:?} is not one of `required`, `disabled`")),
        }
    }
}

fn parse_num<T: FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a whole number in range"))
}

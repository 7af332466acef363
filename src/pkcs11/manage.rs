//! `keygen --pkcs11` and `check` against a token: generating the controller
//! key pair inside it (never extractable, always sensitive), and reporting
//! what the token says about the key.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use peaqos_protocol::{Address, personal_message_hash};

use super::error::TokenError;
use super::session::{Connection, Login, SECP256K1_PARAMS, device};
use super::token_key::TokenKey;
use super::uri::{Pkcs11Uri, hex};

/// Generates a secp256k1 key pair in the token, named by the URI's
/// `object` and `id` (a random 8-byte id when the URI gives none), and
/// returns its address. Refuses when the name is taken.
pub fn generate(uri: &Pkcs11Uri, pin_location: Option<&str>) -> Result<Address, TokenError> {
    let mut login = Login {
        location: pin_location,
        ..Login::default()
    };
    let connection = Connection::open(uri, &mut login, true)?;
    let taken = !connection.find(ObjectClass::PRIVATE_KEY, uri)?.is_empty()
        || !connection.find(ObjectClass::PUBLIC_KEY, uri)?.is_empty();
    if taken {
        return Err(TokenError::Exists {
            token: uri.token_name(),
            key: uri.key_name(),
        });
    }
    let id = if let Some(id) = &uri.id {
        id.clone()
    } else {
        let mut id = vec![0u8; 8];
        getrandom::fill(&mut id).map_err(|_| TokenError::Random)?;
        id
    };
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(SECP256K1_PARAMS.to_vec()),
        Attribute::Id(id.clone()),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Derive(false),
        Attribute::Id(id),
    ];
    if let Some(label) = &uri.object {
        public.push(Attribute::Label(label.as_bytes().to_vec()));
        private.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    let (_, private_handle) = connection
        .session()
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map_err(device(
            "generate a secp256k1 key pair (does it support the curve?)",
        ))?;
    let (_, address) = connection.public_key(uri, private_handle)?;
    Ok(address)
}

/// Destroys the key pair the URI names (its private and public objects),
/// for key rotation's retirement of a key the agent no longer signs with.
/// A key already gone is not an error.
pub fn destroy(uri: &Pkcs11Uri, pin_location: Option<&str>) -> Result<(), TokenError> {
    let mut login = Login {
        location: pin_location,
        ..Login::default()
    };
    let connection = Connection::open(uri, &mut login, true)?;
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        for object in connection.find(class, uri)? {
            connection
                .session()
                .destroy_object(object)
                .map_err(device("destroy the retired key"))?;
        }
    }
    Ok(())
}

/// What `check` reports about a key in a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReport {
    pub token_label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub key: String,
    pub address: Address,
    /// CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE,
    /// CKA_NEVER_EXTRACTABLE as the token reports them (None: not given).
    pub sensitive: Option<bool>,
    pub extractable: Option<bool>,
    pub always_sensitive: Option<bool>,
    pub never_extractable: Option<bool>,
}

impl TokenReport {
    /// Whether the token promises that the key cannot be read out.
    pub fn key_is_protected(&self) -> bool {
        self.sensitive == Some(true) && self.extractable == Some(false)
    }
}

/// Reads what the token says about the key: the token, the key's name and
/// its protection attributes.
pub fn inspect(key: &TokenKey) -> Result<TokenReport, TokenError> {
    key.with_session(|connection, private| report(key, connection, private))
}

fn report(
    key: &TokenKey,
    connection: &Connection,
    private: cryptoki::object::ObjectHandle,
) -> Result<TokenReport, TokenError> {
    let uri = key.uri();
    let info = connection.token_info()?;
    let attrs = connection
        .session()
        .get_attributes(
            private,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Id,
            ],
        )
        .map_err(device("report the key's attributes"))?;
    let flag = |want: AttributeType| {
        attrs.iter().find_map(|a| match (a, want) {
            (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Extractable(v), AttributeType::Extractable)
            | (Attribute::AlwaysSensitive(v), AttributeType::AlwaysSensitive)
            | (Attribute::NeverExtractable(v), AttributeType::NeverExtractable) => Some(*v),
            _ => None,
        })
    };
    let id = attrs.iter().find_map(|a| match a {
        Attribute::Id(id) => Some(hex(id)),
        _ => None,
    });
    Ok(TokenReport {
        token_label: info.label().to_owned(),
        manufacturer: info.manufacturer_id().to_owned(),
        model: info.model().to_owned(),
        serial: info.serial_number().to_owned(),
        key: match (&uri.object, id) {
            (Some(label), Some(id)) => format!("object {label:?} (id {id})"),
            _ => uri.key_name(),
        },
        address: key.address(),
        sensitive: flag(AttributeType::Sensitive),
        extractable: flag(AttributeType::Extractable),
        always_sensitive: flag(AttributeType::AlwaysSensitive),
        never_extractable: flag(AttributeType::NeverExtractable),
    })
}

/// Has the token sign a fixed test text and checks that the signature
/// recovers to the key's address.
pub fn test_signature(key: &TokenKey) -> Result<(), TokenError> {
    const TEXT: &[u8] = b"peaqos-agent check: test signature (never sent anywhere)";
    let signature = key.sign_prehash(&personal_message_hash(TEXT))?;
    match signature.recover_personal(TEXT) {
        Ok(a) if a == key.address() => Ok(()),
        Ok(_) => Err(TokenError::BadSignature(
            peaqos_protocol::RawSignatureError::NotOurs,
        )),
        Err(_) => Err(TokenError::BadSignature(
            peaqos_protocol::RawSignatureError::Scalars,
        )),
    }
}

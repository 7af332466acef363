//! The address form of the DID, `did:peaq:0x<address>`: the account it
//! names controls it, with no look-up at all.

use std::sync::Arc;

use peaqos_protocol::IdentityRef;

use super::{ControllerSource, Resolution, SourceFuture};

/// Resolves address-form DIDs to their own address; machine-id DIDs are not
/// its business (not found).
#[derive(Debug, Default, Clone, Copy)]
pub struct AddressSource;

impl AddressSource {
    pub fn controllers_of(identity: &IdentityRef) -> Resolution {
        identity
            .address()
            .map_or(Resolution::NotFound, |a| Resolution::Found(Arc::from([a])))
    }
}

impl ControllerSource for AddressSource {
    fn name(&self) -> &'static str {
        "address"
    }

    fn resolve<'a>(&'a self, identity: &'a IdentityRef) -> SourceFuture<'a, Resolution> {
        Box::pin(async move { Ok(Self::controllers_of(identity)) })
    }

    fn covers_address_form(&self) -> bool {
        true
    }

    fn ready(&self) -> SourceFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// A source that knows no identity: with neither an MCR API nor a registry
/// file configured, only address-form DIDs resolve.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSource;

impl ControllerSource for NoSource {
    fn name(&self) -> &'static str {
        "none"
    }

    fn resolve<'a>(&'a self, _identity: &'a IdentityRef) -> SourceFuture<'a, Resolution> {
        Box::pin(async { Ok(Resolution::NotFound) })
    }

    fn covers_address_form(&self) -> bool {
        false
    }

    fn ready(&self) -> SourceFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_did_controls_itself_and_nothing_else_resolves() {
        let id = IdentityRef::parse("did:peaq:0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed").unwrap();
        let r = AddressSource::controllers_of(&id);
        assert_eq!(r.controllers(), [id.address().unwrap()]);
        let machine = IdentityRef::parse("did:peaq:7").unwrap();
        assert_eq!(
            AddressSource::controllers_of(&machine),
            Resolution::NotFound
        );
    }
}

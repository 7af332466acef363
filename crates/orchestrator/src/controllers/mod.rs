//! Controller resolution: which EVM addresses control an identity.
//!
//! Three sources sit behind [`ControllerSource`]: the HTTP MCR API
//! (production), a local registry file (self-hosted fleets, the default), and
//! the address form of the DID, whose own address always controls it. The
//! [`Resolver`] puts a short-TTL, single-flight cache in front of the MCR or
//! registry source and adds the DID's own address for the address form.

pub mod address;
pub mod cache;
pub mod mcr_http;
pub mod registry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use peaqos_protocol::{Address, IdentityRef};

pub use address::AddressSource;
pub use cache::ControllerCache;
pub use mcr_http::McrHttpSource;
pub use registry::{RegistryError, RegistrySource};

/// What a source says about an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The identity resolves; these addresses control it (possibly none).
    Found(Arc<[Address]>),
    /// The source does not know the identity: it is not activated.
    NotFound,
}

impl Resolution {
    /// The controllers; empty when not found.
    pub fn controllers(&self) -> &[Address] {
        match self {
            Self::Found(c) => c,
            Self::NotFound => &[],
        }
    }

    pub fn is_controller(&self, address: &Address) -> bool {
        self.controllers().contains(address)
    }

    /// Found with at least one controller.
    pub fn is_active(&self) -> bool {
        !self.controllers().is_empty()
    }
}

/// The source could not answer; nothing may be decided or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("controller source unavailable: {reason}")]
pub struct Unavailable {
    pub reason: String,
}

pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Unavailable>> + Send + 'a>>;

/// A place that knows the controllers of identities.
pub trait ControllerSource: Send + Sync + std::fmt::Debug + 'static {
    /// Short name for logs and metrics (`mcr`, `registry`, `address`).
    fn name(&self) -> &'static str;

    fn resolve<'a>(&'a self, identity: &'a IdentityRef) -> SourceFuture<'a, Resolution>;

    /// Whether this source is asked about address-form DIDs. The MCR API
    /// serves machine DIDs (`did:peaq:<decimal>`) only; a registry file may
    /// list extra controllers for an address DID.
    fn covers_address_form(&self) -> bool;

    /// Whether the source can answer now (readiness).
    fn ready(&self) -> SourceFuture<'_, ()>;
}

/// The controllers of identities, as the HTTP layer asks for them.
#[derive(Debug)]
pub struct Resolver {
    cache: ControllerCache,
    address: AddressSource,
}

impl Resolver {
    pub fn new(cache: ControllerCache) -> Self {
        Self {
            cache,
            address: AddressSource,
        }
    }

    pub fn source_name(&self) -> &'static str {
        self.cache.source().name()
    }

    /// Fresh controller data for `identity`: cached for the TTL, one
    /// look-up at a time per identity.
    pub async fn resolve(&self, identity: &IdentityRef) -> Result<Resolution, Unavailable> {
        let Some(own) = identity.address() else {
            return self.cache.resolve(identity).await;
        };
        if !self.cache.source().covers_address_form() {
            return self.address.resolve(identity).await;
        }
        let listed = self.cache.resolve(identity).await?;
        let mut all = vec![own];
        all.extend(listed.controllers().iter().filter(|a| **a != own));
        Ok(Resolution::Found(all.into()))
    }

    /// Like [`Resolver::resolve`] only if the answer is in the cache and fresh.
    pub fn cached(&self, identity: &IdentityRef) -> Option<Resolution> {
        if identity.address().is_some() && !self.cache.source().covers_address_form() {
            return Some(AddressSource::controllers_of(identity));
        }
        self.cache
            .cached(identity)
            .map(|listed| match identity.address() {
                None => listed,
                Some(own) => {
                    let mut all = vec![own];
                    all.extend(listed.controllers().iter().filter(|a| **a != own));
                    Resolution::Found(all.into())
                }
            })
    }

    pub async fn ready(&self) -> Result<(), Unavailable> {
        self.cache.source().ready().await
    }
}

//! [`RbdStorage`] in a build without librbd: the type exists (so callers need no `cfg`), has
//! no values, and opening fails with [`RbdError::NotBuilt`].

use crate::{ImageIdentity, Locator, RbdError};
use snapmv_engine::{BootId, Storage};
use std::io;

#[derive(Debug)]
enum Never {}

/// An RBD image as engine storage. This build has no librbd: it cannot be opened.
#[derive(Debug)]
pub struct RbdStorage {
    never: Never,
}

/// Fails: [`RbdError::NotBuilt`] (or the locator's error).
pub fn identify(locator: &str) -> io::Result<ImageIdentity> {
    RbdStorage::open(locator).map(|s| match s.never {})
}

/// Fails: [`RbdError::NotBuilt`] (or the locator's error).
pub fn lock_owners_of(locator: &str) -> io::Result<Vec<String>> {
    RbdStorage::open(locator).map(|s| match s.never {})
}

impl RbdStorage {
    /// Fails: [`RbdError::NotBuilt`] (or the locator's error).
    pub fn open(locator: &str) -> io::Result<RbdStorage> {
        let loc = Locator::parse(locator).map_err(RbdError::from)?;
        Err(RbdError::NotBuilt {
            image: loc.image_spec(),
        }
        .into())
    }

    /// Fails: [`RbdError::NotBuilt`] (or the locator's error).
    pub fn open_takeover(locator: &str) -> io::Result<RbdStorage> {
        Self::open(locator)
    }

    /// As with librbd (never called: no value exists).
    pub fn lock_owner_addresses(&self) -> io::Result<Vec<String>> {
        match self.never {}
    }

    /// As with librbd (never called: no value exists).
    pub fn is_owner(&self) -> io::Result<bool> {
        match self.never {}
    }

    /// As with librbd (never called: no value exists).
    pub fn release(&self) -> io::Result<()> {
        match self.never {}
    }

    /// As with librbd (never called: no value exists).
    pub fn fenced_owners(&self) -> &[String] {
        match self.never {}
    }

    /// As with librbd (never called: no value exists).
    pub fn client_address(&self) -> &str {
        match self.never {}
    }

    /// As with librbd (never called: no value exists).
    pub fn image_id(&self) -> &str {
        match self.never {}
    }
}

impl Drop for RbdStorage {
    fn drop(&mut self) {
        match self.never {}
    }
}

impl Storage for RbdStorage {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        match self.never {}
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        match self.never {}
    }
    fn sync(&self) -> io::Result<()> {
        match self.never {}
    }
    fn len(&self) -> io::Result<u64> {
        match self.never {}
    }
    fn name(&self) -> &str {
        match self.never {}
    }
    fn boot_id(&self) -> BootId {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_says_rbd_is_not_built_in() {
        let e = RbdStorage::open("rbd:p/i:id=x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(
            matches!(crate::rbd_error(&e), Some(RbdError::NotBuilt { image }) if image == "rbd:p/i")
        );
        assert!(e.to_string().contains("librbd-dev"), "{e}");
        let e = RbdStorage::open_takeover("rbd:p").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}

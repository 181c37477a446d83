//! `fermyon:spin/variables`: a component sees only the variables its manifest entry binds.

use super::bindings::fermyon::spin2_0_0::variables::{Error, Host};
use super::HostState;

impl Host for HostState {
    async fn get(&mut self, name: String) -> Result<String, Error> {
        if crate::manifest::check_variable_name(&name).is_err() {
            return Err(Error::InvalidName(name));
        }
        match self.ctx.variables.get(&name) {
            Some(v) => Ok(v.clone()),
            None => Err(Error::Undefined(format!("no variable for \"{name}\""))),
        }
    }
}

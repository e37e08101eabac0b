pub mod ledger_only;
pub mod webdriver;

"""stylecast: the command-line package (the top floor; nothing else imports it). The version comes from the
package metadata: `common.version.stylecast_version()`."""

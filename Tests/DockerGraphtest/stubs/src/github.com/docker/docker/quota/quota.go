// Package quota stands in for moby's quota (project quotas on xfs), which Debian's
// golang-github-docker-docker-dev leaves out: graphtest only compares an error with
// ErrQuotaNotSupported.
package quota

import "errors"

// ErrQuotaNotSupported is moby's sentinel for a backing filesystem without project quotas.
var ErrQuotaNotSupported = errors.New("Filesystem does not support, or has not enabled quotas")

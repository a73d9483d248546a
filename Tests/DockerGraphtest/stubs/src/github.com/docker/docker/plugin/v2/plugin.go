// Package v2 stands in for moby's plugin/v2, which Debian's golang-github-docker-docker-dev
// leaves out: daemon/graphdriver only asks a managed (v2) plugin for its PropagatedMount, and
// the graphtest harness uses a legacy (v1) plugin, so this type is never made.
package v2

import (
	"github.com/docker/docker/api/types"
	"github.com/docker/docker/pkg/plugins"
)

// Plugin has what graphdriver's newPluginDriver reads.
type Plugin struct {
	PluginObj types.Plugin
}

func (p *Plugin) Name() string               { return p.PluginObj.Name }
func (p *Plugin) ScopedPath(s string) string { return s }
func (p *Plugin) IsV1() bool                 { return false }
func (p *Plugin) Client() *plugins.Client    { return nil }

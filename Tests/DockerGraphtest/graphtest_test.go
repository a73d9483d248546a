// moby's graphdriver suite (daemon/graphdriver/graphtest) against `thinfs serve
// --docker-plugin`, through moby's own plugin client: graphdriver.GetDriver finds the plugin
// by name (/run/docker/plugins/NAME.sock, pkg/plugins' legacy discovery) and drives it through
// its proxy (daemon/graphdriver/proxy.go), as dockerd --experimental does. One fresh serve and
// root per driver the suite makes.
//
// Built offline in GOPATH mode from Debian's golang-go, golang-github-docker-docker-dev and
// golang-github-vbatts-tar-split-dev, with stubs/ standing in for the two packages Debian leaves
// out; run it with scripts/docker-graphtest.sh (root and /dev/fuse needed).
package graphtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/daemon/graphdriver"
	"github.com/docker/docker/daemon/graphdriver/graphtest"
	"github.com/docker/docker/pkg/idtools"
	"github.com/docker/docker/pkg/plugingetter"
	"github.com/docker/docker/pkg/plugins"
	"github.com/docker/docker/pkg/reexec"
)

// The name the suite asks graphdriver for: a built-in driver that starts a serve and returns
// the plugin driver moby makes for it.
const driverName = "thinfs-graphtest"

func TestMain(m *testing.M) {
	// pkg/archive and chrootarchive re-exec this binary for their helpers; without this the
	// child runs the tests again and the parent waits for it forever.
	if reexec.Init() {
		return
	}
	graphdriver.Register(driverName, newServedDriver)
	os.Exit(m.Run())
}

// legacyPlugins is the PluginGetter dockerd would pass: legacy (v1) plugins by discovery.
type legacyPlugins struct{}

func (legacyPlugins) Get(name, capability string, mode int) (plugingetter.CompatPlugin, error) {
	return plugins.Get(name, capability)
}
func (legacyPlugins) GetAllByCap(string) ([]plugingetter.CompatPlugin, error)      { return nil, nil }
func (legacyPlugins) GetAllManagedPluginsByCap(string) []plugingetter.CompatPlugin { return nil }
func (legacyPlugins) Handle(string, func(string, *plugins.Client))                 {}

// servedDriver is the plugin driver plus the serve behind it, stopped at Cleanup.
type servedDriver struct {
	graphdriver.Driver
	cmd    *exec.Cmd
	root   string
	socket string
}

func (d *servedDriver) Cleanup() error {
	err := d.Driver.Cleanup()
	d.cmd.Process.Signal(syscall.SIGTERM)
	if werr := d.cmd.Wait(); werr != nil && err == nil {
		err = fmt.Errorf("thinfs serve: %v", werr)
	}
	os.RemoveAll(d.root)
	return err
}

var serial int

func newServedDriver(home string, options []string, uidMaps, gidMaps []idtools.IDMap) (graphdriver.Driver, error) {
	bin := os.Getenv("THINFS")
	if bin == "" {
		return nil, graphdriver.ErrNotSupported
	}
	serial++
	name := fmt.Sprintf("thinfs-graphtest-%d-%d", os.Getpid(), serial)
	root, err := os.MkdirTemp("", "thinfs-graphtest-store-")
	if err != nil {
		return nil, err
	}
	socket := "/run/docker/plugins/" + name + ".sock"
	cmd := exec.Command(bin, "serve", "--root", filepath.Join(root, "store"), "--docker-plugin", name,
		"--log-level", "warning",
		"--storage-opt", "dm.basesize=256M", "--storage-opt", "dm.loopdatasize=4G",
		"--storage-opt", "dm.loopmetadatasize=64M", "--storage-opt", "dm.use_deferred_deletion=true")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, fmt.Errorf("thinfs serve did not listen on %s", socket)
		}
		time.Sleep(50 * time.Millisecond)
	}
	d, err := graphdriver.GetDriver(name, legacyPlugins{}, graphdriver.Options{
		Root: filepath.Dir(home), DriverOptions: options, UIDMaps: uidMaps, GIDMaps: gidMaps, ExperimentalEnabled: true})
	if err != nil {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		return nil, err
	}
	return &servedDriver{Driver: d, cmd: cmd, root: root, socket: socket}, nil
}

// The suite's tests with overlay2's arguments (daemon/graphdriver/overlay2/overlay_test.go).
func TestCreateEmpty(t *testing.T)   { graphtest.DriverTestCreateEmpty(t, driverName) }
func TestCreateBase(t *testing.T)    { graphtest.DriverTestCreateBase(t, driverName) }
func TestCreateSnap(t *testing.T)    { graphtest.DriverTestCreateSnap(t, driverName) }
func TestDeepLayerRead(t *testing.T) { graphtest.DriverTestDeepLayerRead(t, 128, driverName) }
func TestDiffApply10(t *testing.T)   { graphtest.DriverTestDiffApply(t, 10, driverName) }
func TestChanges(t *testing.T)       { graphtest.DriverTestChanges(t, driverName) }
func TestTeardown(t *testing.T)      { graphtest.PutDriver(t) }

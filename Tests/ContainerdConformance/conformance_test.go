// containerd's snapshotter conformance suite (snapshots/testsuite) against `thinfs serve
// --containerd-socket`, through containerd's proxy client (snapshots/proxy): what containerd
// itself uses for a proxy snapshotter. One fresh serve and root per subtest.
//
// Built offline in GOPATH mode from Debian's golang-go and golang-github-containerd-containerd-dev;
// run it with scripts/containerd-conformance.sh (root and /dev/fuse needed).
package conformance

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestThinFS(t *testing.T) {
	bin := os.Getenv("THINFS")
	if bin == "" {
		t.Skip("THINFS names the thinfs binary")
	}
	testsuite.SnapshotterSuite(t, "thinfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sock := filepath.Join(root, "snapshots.sock")
		cmd := exec.Command(bin, "serve", "--root", filepath.Join(root, "store"), "--containerd-socket", sock,
			"--log-level", "warning",
			"--storage-opt", "dm.basesize=128M", "--storage-opt", "dm.loopdatasize=1G",
			"--storage-opt", "dm.loopmetadatasize=32M", "--storage-opt", "dm.use_deferred_deletion=true")
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, nil, err
		}
		deadline := time.Now().Add(60 * time.Second)
		for {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				cmd.Wait()
				return nil, nil, os.ErrDeadlineExceeded
			}
			time.Sleep(50 * time.Millisecond)
		}
		conn, err := grpc.Dial(sock, grpc.WithInsecure(), grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, nil, err
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinfs")
		cleanup := func() error {
			conn.Close()
			cmd.Process.Signal(syscall.SIGTERM)
			return cmd.Wait()
		}
		return sn, cleanup, nil
	})
}

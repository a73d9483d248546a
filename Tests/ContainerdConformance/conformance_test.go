// containerd's snapshotter conformance suite (snapshots/testsuite) against `thinfs serve
// --containerd-socket`, through containerd's proxy client (snapshots/proxy): what containerd
// itself uses for a proxy snapshotter. One fresh serve and root per subtest.
//
// Built offline in GOPATH mode from Debian's golang-go and golang-github-containerd-containerd-dev;
// run it with scripts/containerd-conformance.sh (root and /dev/fuse needed).
package conformance

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// How long serve gets to start, and to stop after SIGTERM once nothing mounts its snapshots.
const (
	startTimeout = 60 * time.Second
	stopTimeout  = 30 * time.Second
)

func TestThinFS(t *testing.T) {
	bin := os.Getenv("THINFS")
	if bin == "" {
		t.Skip("THINFS names the thinfs binary")
	}
	testsuite.SnapshotterSuite(t, "thinfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startServe(bin, root)
	})
}

// startServe runs `thinfs serve` on a fresh store under root and connects containerd's proxy
// client to it once its socket accepts. The cleanup unmounts what the subtest left mounted (a
// failed subtest stops before its own unmounts, and a bind mount of a snapshot keeps that
// snapshot's FUSE session, and so serve, alive), stops serve with SIGTERM, and fails when serve
// does not exit 0 in time or leaves a mount behind.
func startServe(bin, root string) (snapshots.Snapshotter, func() error, error) {
	// The suite's temporary directory: root and the subtest's work directory are in it.
	suiteDir := filepath.Dir(root)
	sock := filepath.Join(root, "snapshots.sock")
	level := os.Getenv("THINFS_LOG_LEVEL")
	if level == "" {
		level = "warning"
	}
	args := []string{"serve", "--root", filepath.Join(root, "store"), "--containerd-socket", sock, "--log-level", level}
	pool, err := poolOptions(root)
	if err != nil {
		return nil, nil, err
	}
	for _, opt := range append([]string{"dm.basesize=128M", "dm.use_deferred_deletion=true"}, pool...) {
		args = append(args, "--storage-opt", opt)
	}
	cmd := exec.Command(bin, args...)
	// If this test binary dies (its -timeout panics), serve goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		releasePool(root)
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		releasePool(root)
		return nil, nil, err
	}
	// serve's log lines, each marked with the subtest's directory (the subtests run in parallel).
	logged := make(chan struct{})
	go func() {
		defer close(logged)
		copyPrefixed(os.Stderr, stderr, "serve["+filepath.Base(suiteDir)+"] ")
	}()
	exited := make(chan error, 1)
	go func() {
		<-logged
		exited <- cmd.Wait()
	}()
	kill := func() {
		cmd.Process.Kill()
		<-exited
		unmountUnder(suiteDir)
	}

	deadline := time.Now().Add(startTimeout)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			unmountUnder(suiteDir)
			releasePool(root)
			return nil, nil, fmt.Errorf("thinfs serve exited before its socket accepted: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			kill()
			releasePool(root)
			return nil, nil, fmt.Errorf("thinfs serve: %s did not accept within %v", sock, startTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.Dial(sock, grpc.WithInsecure(), grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", addr)
	}))
	if err != nil {
		kill()
		releasePool(root)
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinfs")
	cleanup := func() error {
		conn.Close()
		var problems []string
		// What the subtest mounted (its work directory) goes first; serve's own mounts are
		// under root/store and serve unmounts them itself.
		if left := unmountUnder(filepath.Join(suiteDir, "work")); len(left) > 0 {
			problems = append(problems, fmt.Sprintf("the subtest left %d mounts (unmounted here): %s", len(left), strings.Join(left, ", ")))
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				problems = append(problems, fmt.Sprintf("thinfs serve exited with %v after SIGTERM", err))
			}
		case <-time.After(stopTimeout):
			problems = append(problems, fmt.Sprintf("thinfs serve did not exit within %v of SIGTERM (mounts: %s); killed",
				stopTimeout, strings.Join(mountsUnder(suiteDir), ", ")))
			kill()
		}
		if left := unmountUnder(suiteDir); len(left) > 0 {
			problems = append(problems, fmt.Sprintf("mounts left after thinfs serve exited: %s", strings.Join(left, ", ")))
		}
		if err := releasePool(root); err != nil {
			problems = append(problems, err.Error())
		}
		if len(problems) > 0 {
			return fmt.Errorf("%s", strings.Join(problems, "; "))
		}
		return nil
	}
	return sn, cleanup, nil
}

// poolOptions gives the storage options of root's pool. By default each subtest's store makes its
// own userspace pool in its root (1 GiB of sparse data). With THINFS_POOL_HOOK set (the kernel-pool
// run in the qemu guest: scripts/vm/tests/containerd-thinpooldev), `HOOK prepare ROOT` hands the
// subtest a pool of its own and prints its options, one per line (dm.thinpooldev=...): a kernel
// pool is adopted by one store only, and the subtests run in parallel.
func poolOptions(root string) ([]string, error) {
	hook := os.Getenv("THINFS_POOL_HOOK")
	if hook == "" {
		return []string{"dm.loopdatasize=1G", "dm.loopmetadatasize=32M"}, nil
	}
	var stderr strings.Builder
	cmd := exec.Command(hook, "prepare", root)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s prepare %s: %v: %s", hook, root, err, strings.TrimSpace(stderr.String()))
	}
	opts := strings.Fields(string(out))
	if len(opts) == 0 {
		return nil, fmt.Errorf("%s prepare %s printed no storage options", hook, root)
	}
	return opts, nil
}

// releasePool runs `HOOK release ROOT` once serve has exited: the hook checks what serve left in
// the pool (thin_check, and the store's devices against the pool's) and fails the subtest if
// that is wrong.
func releasePool(root string) error {
	hook := os.Getenv("THINFS_POOL_HOOK")
	if hook == "" {
		return nil
	}
	if out, err := exec.Command(hook, "release", root).CombinedOutput(); err != nil {
		return fmt.Errorf("%s release %s: %v: %s", hook, root, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// copyPrefixed copies r to w line by line, each line after prefix.
func copyPrefixed(w io.Writer, r io.Reader, prefix string) {
	scanner := bufio.NewScanner(r)
	scanner.Buffer(make([]byte, 64*1024), 1024*1024)
	for scanner.Scan() {
		fmt.Fprintf(w, "%s%s\n", prefix, scanner.Text())
	}
	io.Copy(io.Discard, r)
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		point := unescapeMountinfo(fields[4])
		if point == dir || strings.HasPrefix(point, dir+"/") {
			points = append(points, point)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	return points
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space) in a mountinfo path.
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder unmounts every mount at or below dir (lazily when busy) and returns them.
func unmountUnder(dir string) []string {
	points := mountsUnder(dir)
	for _, p := range points {
		if err := syscall.Unmount(p, 0); err != nil {
			syscall.Unmount(p, syscall.MNT_DETACH)
		}
	}
	return points
}

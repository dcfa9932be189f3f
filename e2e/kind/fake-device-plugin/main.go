// Command fake-device-plugin is unwedge's test stand-in for a GPU device plugin on kind: it
// registers a resource (unwedge.io/fake-gpu) with the node's real kubelet through the
// device-plugin API and advertises fake GPUs named by PCI BDF, as AMD's plugin names them, so the
// kubelet really allocates them and the real PodResources API reports which pod holds which.
// It also lays out the agent's fake sysfs and /dev trees for those cards on a host path and
// journals every write to their control files (see sysfs.go).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	dp "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

func main() {
	resource := flag.String("resource", "unwedge.io/fake-gpu", "extended resource name to register")
	count := flag.Int("count", 8, "number of fake GPUs (BDFs 0000:03:00.0 upwards)")
	pluginDir := flag.String("device-plugin-dir", dp.DevicePluginPath, "kubelet device-plugin directory")
	fakeRoot := flag.String("fake-root", "/var/lib/unwedge-fake", "where the fake sysfs, dev tree and journal live (a host path of the node)")
	mountCards := flag.Bool("mount-cards", true, "bind-mount the fake /dev/dri/cardN and renderD files of allocated cards into containers")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	tree := &fakeTree{root: *fakeRoot, cards: cards(*count)}
	if err := os.MkdirAll(*fakeRoot, 0o755); err != nil {
		log.Fatalf("fake root: %v", err)
	}
	if err := tree.layout(); err != nil {
		log.Fatalf("laying out the fake sysfs tree: %v", err)
	}
	p := &plugin{
		resource:   *resource,
		dir:        *pluginDir,
		socket:     filepath.Join(*pluginDir, "unwedge-fake-gpu.sock"),
		tree:       tree,
		mountCards: *mountCards,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	p.run(ctx)
}

// plugin serves the DevicePlugin service on its own socket in the kubelet's directory.
type plugin struct {
	dp.UnimplementedDevicePluginServer
	resource   string
	dir        string
	socket     string
	tree       *fakeTree
	mountCards bool
}

// run (re-)starts the server and registers whenever the kubelet restarted: the kubelet removes
// every plugin socket when it starts, and its own socket gets a new inode.
func (p *plugin) run(ctx context.Context) {
	kubeletSock := filepath.Join(p.dir, "kubelet.sock")
	var srv *grpc.Server
	var kubeletIno uint64
	for {
		var st syscall.Stat_t
		_, ownErr := os.Stat(p.socket)
		kerr := syscall.Stat(kubeletSock, &st)
		if kerr == nil && (srv == nil || ownErr != nil || st.Ino != kubeletIno) {
			if srv != nil {
				log.Printf("kubelet restarted (socket recreated): serving and registering again")
				srv.Stop()
			}
			s, err := p.serve()
			if err == nil {
				err = p.register(ctx, kubeletSock)
			}
			if err != nil {
				log.Printf("registration failed, retrying: %v", err)
				if s != nil {
					s.Stop()
				}
				srv = nil
			} else {
				srv, kubeletIno = s, st.Ino
				log.Printf("registered %s (%d devices) with the kubelet", p.resource, len(p.tree.cards))
			}
		}
		select {
		case <-ctx.Done():
			if srv != nil {
				srv.Stop()
			}
			os.Remove(p.socket)
			return
		case <-time.After(time.Second):
		}
	}
}

func (p *plugin) serve() (*grpc.Server, error) {
	if err := os.Remove(p.socket); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	l, err := net.Listen("unix", p.socket)
	if err != nil {
		return nil, err
	}
	s := grpc.NewServer()
	dp.RegisterDevicePluginServer(s, p)
	go func() {
		if err := s.Serve(l); err != nil {
			log.Printf("device plugin server: %v", err)
		}
	}()
	return s, nil
}

func (p *plugin) register(ctx context.Context, kubeletSock string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+kubeletSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = dp.NewRegistrationClient(conn).Register(ctx, &dp.RegisterRequest{
		Version:      dp.Version,
		Endpoint:     filepath.Base(p.socket),
		ResourceName: p.resource,
		Options:      &dp.DevicePluginOptions{},
	})
	return err
}

// devices reads the health overrides: a file <fake-root>/unhealthy listing BDFs, one a line,
// marks those Unhealthy.
func (p *plugin) devices() []*dp.Device {
	bad := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(p.tree.root, "unhealthy")); err == nil {
		for _, l := range strings.Fields(string(data)) {
			bad[l] = true
		}
	}
	out := make([]*dp.Device, 0, len(p.tree.cards))
	for _, c := range p.tree.cards {
		h := dp.Healthy
		if bad[c.BDF] {
			h = dp.Unhealthy
		}
		out = append(out, &dp.Device{ID: c.BDF, Health: h})
	}
	return out
}

// GetDevicePluginOptions: no PreStartContainer, no preferred allocation.
func (p *plugin) GetDevicePluginOptions(context.Context, *dp.Empty) (*dp.DevicePluginOptions, error) {
	return &dp.DevicePluginOptions{}, nil
}

// ListAndWatch sends the device list, then again whenever a device's health changes.
func (p *plugin) ListAndWatch(_ *dp.Empty, s grpc.ServerStreamingServer[dp.ListAndWatchResponse]) error {
	last := ""
	for {
		devs := p.devices()
		key := fmt.Sprint(devs)
		if key != last {
			if err := s.Send(&dp.ListAndWatchResponse{Devices: devs}); err != nil {
				return err
			}
			last = key
		}
		select {
		case <-s.Context().Done():
			return nil
		case <-time.After(2 * time.Second):
		}
	}
}

// Allocate tells the kubelet to give each container FAKE_GPU=<comma-separated BDFs>,
// FAKE_GPU_CARDS=<cardN,...> and, with --mount-cards, the fake card and render files at
// /dev/dri/ inside the container.
func (p *plugin) Allocate(_ context.Context, req *dp.AllocateRequest) (*dp.AllocateResponse, error) {
	resp := &dp.AllocateResponse{}
	for _, cr := range req.ContainerRequests {
		car := &dp.ContainerAllocateResponse{Envs: map[string]string{}}
		var names []string
		for _, id := range cr.DevicesIds {
			c, ok := p.card(id)
			if !ok {
				return nil, fmt.Errorf("unknown device %q", id)
			}
			names = append(names, fmt.Sprintf("card%d", c.Index))
			if p.mountCards {
				for _, m := range []string{fmt.Sprintf("card%d", c.Index), fmt.Sprintf("renderD%d", 128+c.Index)} {
					car.Mounts = append(car.Mounts, &dp.Mount{
						ContainerPath: "/dev/dri/" + m,
						HostPath:      filepath.Join(p.tree.root, "dev", "dri", m),
					})
				}
			}
		}
		car.Envs["FAKE_GPU"] = strings.Join(cr.DevicesIds, ",")
		car.Envs["FAKE_GPU_CARDS"] = strings.Join(names, ",")
		log.Printf("allocate %v", cr.DevicesIds)
		resp.ContainerResponses = append(resp.ContainerResponses, car)
	}
	return resp, nil
}

func (p *plugin) card(bdf string) (card, bool) {
	for _, c := range p.tree.cards {
		if c.BDF == bdf {
			return c, true
		}
	}
	return card{}, false
}

// PreStartContainer is not requested in the options; answer empty if called.
func (p *plugin) PreStartContainer(context.Context, *dp.PreStartContainerRequest) (*dp.PreStartContainerResponse, error) {
	return &dp.PreStartContainerResponse{}, nil
}

// GetPreferredAllocation is not requested in the options; answer empty if called.
func (p *plugin) GetPreferredAllocation(context.Context, *dp.PreferredAllocationRequest) (*dp.PreferredAllocationResponse, error) {
	return &dp.PreferredAllocationResponse{}, nil
}

package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// card is one fake GPU: its PCI address, its DRM minor and the root port it sits behind.
type card struct {
	BDF    string // 0000:03:00.0
	Index  int    // cardN, renderD(128+N)
	Bridge string // 0000:00:01.N
}

// cards returns n fake GPUs named like a real plugin names them: PCI BDFs 0000:03:00.0, 0000:04:00.0, ...
func cards(n int) []card {
	out := make([]card, n)
	for i := range n {
		out[i] = card{
			BDF:    fmt.Sprintf("0000:%02x:00.0", 3+i),
			Index:  i,
			Bridge: fmt.Sprintf("0000:00:%02x.0", 1+i),
		}
	}
	return out
}

// fakeTree lays out, under root, a sysfs tree (root/sysfs) shaped like the kernel's for amdgpu
// cards and a dev tree (root/dev/dri), and journals every write to its control files. The
// control files (driver bind/unbind, per-device reset and remove, bus rescan) are FIFOs: a
// goroutine per FIFO reads each writer's value, appends "time<TAB>file<TAB>value" to
// root/journal.log, then applies the effect (unbind removes the device's `driver` link, bind
// restores it, remove takes the driver away too, rescan restores every removed device).
type fakeTree struct {
	root  string
	cards []card
	mu    sync.Mutex // serialises the journal and the effects
}

const (
	amdVendor  = "0x1002"
	mi300x     = "0x74a1"
	classGPU   = "0x038000"
	classPCIPB = "0x060400"
	drvName    = "amdgpu"
)

func (t *fakeTree) sys(p ...string) string {
	return filepath.Join(append([]string{t.root, "sysfs"}, p...)...)
}

func (t *fakeTree) devDir(c card) string {
	return t.sys("devices", "pci0000:00", c.Bridge, c.BDF)
}

// layout removes any previous sysfs and dev trees under root and lays them out afresh. The
// journal is kept: it is the record of every write across plugin restarts.
func (t *fakeTree) layout() error {
	for _, d := range []string{t.sys(), filepath.Join(t.root, "dev")} {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	drv := t.sys("bus", "pci", "drivers", drvName)
	dirs := []string{drv, t.sys("bus", "pci", "devices"), t.sys("class", "drm"), filepath.Join(t.root, "dev", "dri")}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	files := map[string]string{}
	links := map[string]string{}
	fifos := []string{filepath.Join(drv, "bind"), filepath.Join(drv, "unbind"), t.sys("bus", "pci", "rescan")}
	for _, c := range t.cards {
		br := t.sys("devices", "pci0000:00", c.Bridge)
		d := t.devDir(c)
		card, render := fmt.Sprintf("card%d", c.Index), fmt.Sprintf("renderD%d", 128+c.Index)
		for f, v := range map[string]string{"vendor": "0x8086", "device": "0x7a38", "class": classPCIPB} {
			files[filepath.Join(br, f)] = v
		}
		for f, v := range map[string]string{
			"vendor": amdVendor, "device": mi300x, "class": classGPU,
			"subsystem_vendor": amdVendor, "subsystem_device": "0x74a1",
			"reset_method": "flr bus",
			"uevent": fmt.Sprintf("DRIVER=%s\nPCI_CLASS=38000\nPCI_ID=1002:74A1\nPCI_SUBSYS_ID=1002:74A1\nPCI_SLOT_NAME=%s\nMODALIAS=pci:v00001002d000074A1sv00001002sd000074A1bc03sc80i00\n", drvName, c.BDF),
		} {
			files[filepath.Join(d, f)] = v
		}
		for i, minor := range []string{card, render} {
			m := c.Index + 128*i
			files[filepath.Join(d, "drm", minor, "dev")] = fmt.Sprintf("226:%d", m)
			files[filepath.Join(d, "drm", minor, "uevent")] = fmt.Sprintf("MAJOR=226\nMINOR=%d\nDEVNAME=dri/%s\nDEVTYPE=drm_minor\n", m, minor)
			links[filepath.Join(d, "drm", minor, "device")] = "../../../" + c.BDF
			links[filepath.Join(d, "drm", minor, "subsystem")] = "../../../../../../class/drm"
			links[t.sys("class", "drm", minor)] = fmt.Sprintf("../../devices/pci0000:00/%s/%s/drm/%s", c.Bridge, c.BDF, minor)
			files[filepath.Join(t.root, "dev", "dri", minor)] = ""
		}
		links[filepath.Join(d, "driver")] = "../../../../bus/pci/drivers/" + drvName
		links[filepath.Join(d, "subsystem")] = "../../../../bus/pci"
		links[filepath.Join(drv, c.BDF)] = fmt.Sprintf("../../../../devices/pci0000:00/%s/%s", c.Bridge, c.BDF)
		links[t.sys("bus", "pci", "devices", c.BDF)] = fmt.Sprintf("../../../devices/pci0000:00/%s/%s", c.Bridge, c.BDF)
		links[t.sys("bus", "pci", "devices", c.Bridge)] = "../../../devices/pci0000:00/" + c.Bridge
		fifos = append(fifos, filepath.Join(d, "reset"), filepath.Join(d, "remove"))
	}
	for p, v := range files {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, []byte(v+nl(v)), 0o644); err != nil {
			return err
		}
	}
	for p, target := range links {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.Symlink(target, p); err != nil {
			return err
		}
	}
	for _, p := range fifos {
		if err := syscall.Mkfifo(p, 0o200); err != nil {
			return fmt.Errorf("mkfifo %s: %w", p, err)
		}
		go t.serve(p)
	}
	log.Printf("fake sysfs: %d cards under %s, %d journaled control files", len(t.cards), t.sys(), len(fifos))
	return nil
}

// nl adds the trailing newline sysfs attributes carry; empty files stay empty.
func nl(v string) string {
	if v == "" || strings.HasSuffix(v, "\n") {
		return ""
	}
	return "\n"
}

// serve reads one FIFO forever: each writer's data (until it closes) is one write.
func (t *fakeTree) serve(path string) {
	for {
		f, err := os.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return // the tree was laid out again; the new FIFO has its own reader
			}
			log.Printf("open %s: %v", path, err)
			time.Sleep(time.Second)
			continue
		}
		data, err := io.ReadAll(bufio.NewReader(f))
		f.Close()
		if err != nil {
			log.Printf("read %s: %v", path, err)
			continue
		}
		for _, v := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
			if v = strings.TrimSpace(v); v != "" {
				t.written(path, v)
			}
		}
	}
}

// written journals one write and applies its effect.
func (t *fakeTree) written(path, value string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rel, _ := filepath.Rel(t.root, path)
	line := fmt.Sprintf("%s\t%s\t%s\n", time.Now().UTC().Format(time.RFC3339Nano), rel, value)
	j, err := os.OpenFile(filepath.Join(t.root, "journal.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err == nil {
		_, err = j.WriteString(line)
		if cerr := j.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		log.Printf("journal: %v", err)
	}
	log.Printf("write %s = %q", rel, value)
	switch filepath.Base(path) {
	case "unbind":
		t.setDriver(value, false)
	case "bind":
		t.setDriver(value, true)
	case "remove":
		t.setDriver(filepath.Base(filepath.Dir(path)), false)
	case "rescan":
		for _, c := range t.cards {
			if _, err := os.Lstat(filepath.Join(t.devDir(c), "driver")); err != nil {
				t.setDriver(c.BDF, true)
			}
		}
	}
}

// setDriver binds (creates the `driver` link and the driver's link to the device) or unbinds.
func (t *fakeTree) setDriver(bdf string, bound bool) {
	for _, c := range t.cards {
		if c.BDF != bdf {
			continue
		}
		link := filepath.Join(t.devDir(c), "driver")
		back := t.sys("bus", "pci", "drivers", drvName, bdf)
		os.Remove(link)
		os.Remove(back)
		if bound {
			if err := os.Symlink("../../../../bus/pci/drivers/"+drvName, link); err != nil {
				log.Printf("bind %s: %v", bdf, err)
			}
			if err := os.Symlink(fmt.Sprintf("../../../../devices/pci0000:00/%s/%s", c.Bridge, bdf), back); err != nil {
				log.Printf("bind %s: %v", bdf, err)
			}
		}
		return
	}
	log.Printf("no fake device %q: write journaled, nothing changed", bdf)
}

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// write opens a control file like the agent does and writes one value.
func write(t *testing.T, path, value string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestLayoutResolvesLikeTheKernel(t *testing.T) {
	root := t.TempDir()
	tr := &fakeTree{root: root, cards: cards(8)}
	if err := tr.layout(); err != nil {
		t.Fatal(err)
	}
	sys := filepath.Join(root, "sysfs")
	dev, err := filepath.EvalSymlinks(filepath.Join(sys, "class/drm/card3/device"))
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(dev) != "0000:06:00.0" || filepath.Base(filepath.Dir(dev)) != "0000:00:04.0" {
		t.Fatalf("card3/device resolves to %s", dev)
	}
	drv, err := filepath.EvalSymlinks(filepath.Join(dev, "driver"))
	if err != nil || drv != filepath.Join(sys, "bus/pci/drivers/amdgpu") {
		t.Fatalf("driver link: %s %v", drv, err)
	}
	viaBus, err := filepath.EvalSymlinks(filepath.Join(sys, "bus/pci/devices/0000:06:00.0"))
	if err != nil || viaBus != dev {
		t.Fatalf("bus/pci/devices link: %s %v", viaBus, err)
	}
	back, err := filepath.EvalSymlinks(filepath.Join(sys, "bus/pci/drivers/amdgpu/0000:06:00.0"))
	if err != nil || back != dev {
		t.Fatalf("driver's device link: %s %v", back, err)
	}
	if d, _ := os.ReadFile(filepath.Join(dev, "drm/renderD131/dev")); string(d) != "226:131\n" {
		t.Fatalf("renderD131/dev = %q", d)
	}
	if _, err := os.Stat(filepath.Join(root, "dev/dri/card7")); err != nil {
		t.Fatal(err)
	}
}

func TestWritesAreJournaledAndApplied(t *testing.T) {
	root := t.TempDir()
	tr := &fakeTree{root: root, cards: cards(8)}
	if err := tr.layout(); err != nil {
		t.Fatal(err)
	}
	sys := filepath.Join(root, "sysfs")
	driver := filepath.Join(sys, "bus/pci/devices/0000:06:00.0/driver")
	journal := func() string { b, _ := os.ReadFile(filepath.Join(root, "journal.log")); return string(b) }

	write(t, filepath.Join(sys, "bus/pci/drivers/amdgpu/unbind"), "0000:06:00.0")
	waitFor(t, "unbind to remove the driver link", func() bool { _, err := os.Lstat(driver); return os.IsNotExist(err) })
	if _, err := os.Lstat(filepath.Join(sys, "bus/pci/devices/0000:05:00.0/driver")); err != nil {
		t.Fatal("unbind of one device touched another")
	}
	write(t, filepath.Join(sys, "bus/pci/devices/0000:06:00.0/reset"), "1\n")
	write(t, filepath.Join(sys, "bus/pci/drivers/amdgpu/bind"), "0000:06:00.0\n")
	waitFor(t, "bind to restore the driver link", func() bool { _, err := os.Stat(driver); return err == nil })
	waitFor(t, "three journal lines", func() bool { return strings.Count(journal(), "\n") == 3 })
	lines := strings.Split(strings.TrimSpace(journal()), "\n")
	want := []string{
		"sysfs/bus/pci/drivers/amdgpu/unbind\t0000:06:00.0",
		"sysfs/devices/pci0000:00/0000:00:04.0/0000:06:00.0/reset\t1",
		"sysfs/bus/pci/drivers/amdgpu/bind\t0000:06:00.0",
	}
	for i, w := range want {
		if _, rest, _ := strings.Cut(lines[i], "\t"); rest != w {
			t.Fatalf("journal line %d = %q, want suffix %q", i, lines[i], w)
		}
	}
}

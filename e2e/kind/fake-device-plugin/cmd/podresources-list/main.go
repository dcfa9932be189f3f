// Command podresources-list asks the kubelet's PodResources API (v1 List) which pod and
// container holds which device, and prints one line per device:
// "<namespace>/<pod> <container> <resource> <device id>". With -allocatable it prints the
// devices the kubelet can allocate instead: "allocatable <resource> <device id>".
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pr "k8s.io/kubelet/pkg/apis/podresources/v1"
)

func main() {
	socket := flag.String("socket", "/var/lib/kubelet/pod-resources/kubelet.sock", "PodResources socket")
	alloc := flag.Bool("allocatable", false, "print allocatable devices instead of assignments")
	flag.Parse()
	conn, err := grpc.NewClient("unix://"+*socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := pr.NewPodResourcesListerClient(conn)
	if *alloc {
		r, err := c.GetAllocatableResources(ctx, &pr.AllocatableResourcesRequest{})
		if err != nil {
			log.Fatal(err)
		}
		for _, d := range r.GetDevices() {
			for _, id := range d.GetDeviceIds() {
				fmt.Printf("allocatable %s %s\n", d.GetResourceName(), id)
			}
		}
		return
	}
	r, err := c.List(ctx, &pr.ListPodResourcesRequest{})
	if err != nil {
		log.Fatal(err)
	}
	for _, p := range r.GetPodResources() {
		for _, ct := range p.GetContainers() {
			for _, d := range ct.GetDevices() {
				for _, id := range d.GetDeviceIds() {
					fmt.Printf("%s/%s %s %s %s\n", p.GetNamespace(), p.GetName(), ct.GetName(), d.GetResourceName(), id)
				}
			}
		}
	}
}

// Command adsload is the load generator of benchmarks/ads_scale.py: many lightweight ADS
// clients (state of the world or delta) on a few gRPC connections, each behaving like an Envoy
// that ACKs every response at once.
//
// It is kept light so that it is not the bottleneck: messages are encoded and decoded by hand
// with protowire (only the few fields a client needs; resources are skipped, not decoded), and
// every stream is one goroutine.
//
// Protocol: commands on stdin, one JSON object per line on stdout.
//
//	start            open every stream at once (no ramp); prints {"event":"ready",...} once every
//	                 stream has received and ACKed CDS, EDS, LDS and RDS (or at -ready-timeout)
//	wait V T0 S      wait up to S seconds until every live stream has received EDS version V;
//	                 T0 is the wall-clock time (Unix ns) of the change; prints the latencies
//	stats            prints stream counts: live, lost (ended by the server or an error), by code
//	quit             closes everything and exits
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	typeCluster  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	typeEndpoint = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	typeListener = "type.googleapis.com/envoy.config.listener.v3.Listener"
	typeRoute    = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	service      = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
)

// rawCodec passes already-encoded messages through gRPC.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

var (
	addr         = flag.String("addr", "127.0.0.1:15010", "ADS server address(es), comma-separated: a stream that ends reconnects to the next one (with -reconnect)")
	learn        = flag.Bool("learn", false, "subscribe EDS/RDS to the names the CDS/LDS responses reference (like Envoy) instead of svc-N / outbound")
	nodeFormat   = flag.String("node-format", "", "node id format with one %d (default: -node-prefix + index)")
	streams      = flag.Int("streams", 1000, "number of ADS streams (one node id each)")
	conns        = flag.Int("conns", 10, "gRPC connections the streams are spread over")
	delta        = flag.Bool("delta", false, "incremental xDS instead of state of the world")
	services     = flag.Int("services", 1000, "EDS names requested: svc-0 .. svc-(N-1)")
	nodePrefix   = flag.String("node-prefix", "node-", "node id prefix (node-0, node-1, ...)")
	nodeOffset   = flag.Int("node-offset", 0, "first node index")
	readyTimeout = flag.Duration("ready-timeout", 600*time.Second, "give up waiting for ready")
	reconnect    = flag.Bool("reconnect", false, "reopen a stream that ended (like Envoy)")
)

type stream struct {
	node  string
	ready atomic.Bool
	mu    sync.Mutex
	seen  map[string]int64  // EDS version -> first seen (Unix ns)
	held  map[string]string // type URL -> version held (kept across reconnects)
	addr  int               // index of the address in use
	lost  bool              // lost its connection and not yet served again
}

type state struct {
	mu        sync.Mutex
	out       *json.Encoder
	streams   []*stream
	live      atomic.Int64
	ready     atomic.Int64
	lost      atomic.Int64
	reconns   atomic.Int64
	resumed   atomic.Int64 // streams served again after a reconnect
	changed   atomic.Int64 // types whose version differed after a reconnect
	unchanged atomic.Int64 // types whose version was the same after a reconnect
	lastBack  atomic.Int64 // Unix ns of the last stream served again
	firstLoss atomic.Int64 // Unix ns of the first stream lost
	codes     map[string]int
	sample    map[string]string // code -> one error message
	names     []string
	// the resource_names of the EDS (names) and RDS ("outbound") requests, encoded once
	encodedEDS   []byte
	encodedRoute []byte
	readyCh      chan struct{}
	readyOnce    sync.Once
}

func (s *state) emit(v map[string]any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_ = s.out.Encode(v)
}

func appendString(b []byte, num protowire.Number, v string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, v)
}

func nodeMsg(id string) []byte {
	var n []byte
	n = appendString(n, 1, id)
	n = appendString(n, 2, "bench")
	return n
}

// sotwRequest: DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4,
// response_nonce=5}.
// names: the resource_names fields already encoded (encodeNames), so an ACK repeating 1,000
// names is one copy, not 1,000 encodings (the load generator stays lighter than the server).
func sotwRequest(node, typeURL, version, nonce string, names []byte) []byte {
	b := make([]byte, 0, len(names)+len(version)+len(typeURL)+len(nonce)+64)
	if version != "" {
		b = appendString(b, 1, version)
	}
	if node != "" {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, nodeMsg(node))
	}
	b = append(b, names...)
	b = appendString(b, 4, typeURL)
	if nonce != "" {
		b = appendString(b, 5, nonce)
	}
	return b
}

// encodeNames: resource_names (field 3) of a DiscoveryRequest, encoded.
func encodeNames(names []string) []byte {
	var b []byte
	for _, n := range names {
		b = appendString(b, 3, n)
	}
	return b
}

// deltaRequest: DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3,
// response_nonce=6}.
func deltaRequest(node, typeURL, nonce string, subscribe []string) []byte {
	var b []byte
	if node != "" {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, nodeMsg(node))
	}
	b = appendString(b, 2, typeURL)
	for _, n := range subscribe {
		b = appendString(b, 3, n)
	}
	if nonce != "" {
		b = appendString(b, 6, nonce)
	}
	return b
}

// parseResponse reads version (field 1), type_url (4) and nonce (5) of a DiscoveryResponse or
// DeltaDiscoveryResponse (same numbers), skipping everything else.
func parseResponse(b []byte) (version, typeURL, nonce string, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", "", "", protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.BytesType && (num == 1 || num == 4 || num == 5) {
			v, m := protowire.ConsumeString(b)
			if m < 0 {
				return "", "", "", protowire.ParseError(m)
			}
			switch num {
			case 1:
				version = v
			case 4:
				typeURL = v
			case 5:
				nonce = v
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return "", "", "", protowire.ParseError(m)
		}
		b = b[m:]
	}
	return
}

func (s *state) run(ctx context.Context, clients [][]*grpc.ClientConn, k int, st *stream) {
	for {
		began := time.Now()
		cc := clients[st.addr][k%len(clients[st.addr])]
		err := s.once(ctx, cc, st)
		if ctx.Err() != nil {
			return
		}
		code := status.Code(err).String()
		if err == io.EOF {
			code = "EOF"
		}
		s.lost.Add(1)
		s.firstLoss.CompareAndSwap(0, time.Now().UnixNano())
		s.mu.Lock()
		s.codes[code]++
		if _, ok := s.sample[code]; !ok && err != nil {
			s.sample[code] = fmt.Sprintf("%v (after %.1f s, ready %v)", err, time.Since(began).Seconds(), st.ready.Load())
		}
		s.mu.Unlock()
		if os.Getenv("ADSLOAD_DEBUG") != "" {
			fmt.Fprintf(os.Stderr, "lost %s after %.1f s ready=%v: %v\n", st.node, time.Since(began).Seconds(), st.ready.Load(), err)
		}
		if !*reconnect {
			return
		}
		st.mu.Lock()
		st.lost = true
		st.mu.Unlock()
		s.reconns.Add(1)
		st.addr = (st.addr + 1) % len(clients)
		time.Sleep(time.Duration(50+k%100) * time.Millisecond)
	}
}

// clusterEDSNames: the EDS names of the EDS clusters in a CDS response's resources.
func clusterEDSNames(resources [][]byte) []string {
	var out []string
	for _, c := range resources {
		name, eds, service := "", false, ""
		walk(c, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) {
			switch {
			case num == 1 && typ == protowire.BytesType:
				name = string(v)
			case num == 2 && typ == protowire.VarintType:
				eds = x == 3
			case num == 3 && typ == protowire.BytesType:
				walk(v, func(n protowire.Number, t protowire.Type, w []byte, _ uint64) {
					if n == 2 && t == protowire.BytesType {
						service = string(w)
					}
				})
			}
		})
		if eds {
			if service == "" {
				service = name
			}
			out = append(out, service)
		}
	}
	sort.Strings(out)
	return out
}

// listenerRouteNames: the RDS route names the HTTP connection managers of a LDS response use.
func listenerRouteNames(resources [][]byte) []string {
	found := map[string]bool{}
	chain := func(fc []byte) {
		walk(fc, func(n protowire.Number, t protowire.Type, f []byte, _ uint64) {
			if n != 3 || t != protowire.BytesType {
				return
			}
			walk(f, func(n protowire.Number, t protowire.Type, anyMsg []byte, _ uint64) {
				if n != 4 || t != protowire.BytesType {
					return
				}
				walk(anyMsg, func(n protowire.Number, t protowire.Type, hcm []byte, _ uint64) {
					if n != 2 || t != protowire.BytesType {
						return
					}
					walk(hcm, func(n protowire.Number, t protowire.Type, rds []byte, _ uint64) {
						if n != 3 || t != protowire.BytesType {
							return
						}
						walk(rds, func(n protowire.Number, t protowire.Type, v []byte, _ uint64) {
							if n == 2 && t == protowire.BytesType {
								found[string(v)] = true
							}
						})
					})
				})
			})
		})
	}
	for _, l := range resources {
		walk(l, func(n protowire.Number, t protowire.Type, v []byte, _ uint64) {
			if (n == 3 || n == 25) && t == protowire.BytesType {
				chain(v)
			}
		})
	}
	var out []string
	for k := range found {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// walk calls fn for every field of a message (bytes value or varint).
func walk(b []byte, fn func(protowire.Number, protowire.Type, []byte, uint64)) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return
		}
		b = b[n:]
		switch typ {
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return
			}
			fn(num, typ, v, 0)
			b = b[m:]
		case protowire.VarintType:
			x, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return
			}
			fn(num, typ, nil, x)
			b = b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return
			}
			b = b[m:]
		}
	}
}

// anyValues: the value bytes of the resources (field 2, Any) of a response.
func anyValues(resp []byte, delta bool) [][]byte {
	var out [][]byte
	walk(resp, func(n protowire.Number, t protowire.Type, v []byte, _ uint64) {
		if n != 2 || t != protowire.BytesType {
			return
		}
		if delta { // Resource{name=3, version=1, resource=2 (Any)}
			walk(v, func(n protowire.Number, t protowire.Type, a []byte, _ uint64) {
				if n == 2 && t == protowire.BytesType {
					walk(a, func(n protowire.Number, t protowire.Type, w []byte, _ uint64) {
						if n == 2 && t == protowire.BytesType {
							out = append(out, w)
						}
					})
				}
			})
			return
		}
		walk(v, func(n protowire.Number, t protowire.Type, w []byte, _ uint64) {
			if n == 2 && t == protowire.BytesType {
				out = append(out, w)
			}
		})
	})
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func (s *state) once(ctx context.Context, cc *grpc.ClientConn, st *stream) error {
	method := "StreamAggregatedResources"
	if *delta {
		method = "DeltaAggregatedResources"
	}
	desc := &grpc.StreamDesc{StreamName: method, ServerStreams: true, ClientStreams: true}
	cs, err := cc.NewStream(ctx, desc, service+method, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	s.live.Add(1)
	defer s.live.Add(-1)
	send := func(b []byte) error { return cs.SendMsg(&b) }
	names := map[string][]string{typeEndpoint: s.names, typeRoute: {"outbound"}}
	encoded := map[string][]byte{typeEndpoint: s.encodedEDS, typeRoute: s.encodedRoute}
	if *learn {
		names = map[string][]string{}
		encoded = map[string][]byte{}
	}
	st.mu.Lock()
	held := map[string]string{}
	for k, v := range st.held {
		held[k] = v
	}
	resuming := st.lost
	st.mu.Unlock()
	nonces := map[string]string{}
	request := func(t string, node string) error {
		var msg []byte
		if *delta {
			msg = deltaRequest(node, t, "", names[t])
		} else {
			msg = sotwRequest(node, t, held[t], nonces[t], encoded[t])
		}
		return send(msg)
	}
	for i, t := range []string{typeCluster, typeEndpoint, typeListener, typeRoute} {
		if *learn && (t == typeEndpoint || t == typeRoute) {
			continue
		}
		node := ""
		if i == 0 {
			node = st.node
		}
		if err := request(t, node); err != nil {
			return err
		}
	}
	got := map[string]bool{}
	checked := map[string]bool{}
	for {
		var resp []byte
		if err := cs.RecvMsg(&resp); err != nil {
			return err
		}
		now := time.Now().UnixNano()
		version, typeURL, nonce, err := parseResponse(resp)
		if err != nil {
			return err
		}
		if resuming && !checked[typeURL] {
			checked[typeURL] = true
			if old, ok := held[typeURL]; ok {
				if old == version {
					s.unchanged.Add(1)
				} else {
					s.changed.Add(1)
					if os.Getenv("ADSLOAD_DEBUG") != "" {
						fmt.Fprintf(os.Stderr, "%s: %s changed on reconnect: %s -> %s\n", st.node, typeURL, old, version)
					}
				}
			}
		}
		held[typeURL] = version
		nonces[typeURL] = nonce
		var ack []byte
		if *delta {
			ack = deltaRequest("", typeURL, nonce, nil)
		} else {
			ack = sotwRequest("", typeURL, version, nonce, encoded[typeURL])
		}
		if err := send(ack); err != nil {
			return err
		}
		if *learn && !*delta && (typeURL == typeCluster || typeURL == typeListener) {
			dep, want := typeEndpoint, []string(nil)
			if typeURL == typeCluster {
				want = clusterEDSNames(anyValues(resp, false))
			} else {
				dep, want = typeRoute, listenerRouteNames(anyValues(resp, false))
			}
			if !equal(want, names[dep]) {
				names[dep] = want
				encoded[dep] = encodeNames(want)
				if err := request(dep, ""); err != nil {
					return err
				}
			}
		}
		st.mu.Lock()
		st.held[typeURL] = version
		if typeURL == typeEndpoint {
			if _, ok := st.seen[version]; !ok {
				st.seen[version] = now
			}
		}
		st.mu.Unlock()
		got[typeURL] = true
		complete := got[typeCluster] && got[typeListener] &&
			(got[typeEndpoint] || len(names[typeEndpoint]) == 0) &&
			(got[typeRoute] || len(names[typeRoute]) == 0)
		if complete && resuming {
			resuming = false
			st.mu.Lock()
			st.lost = false
			st.mu.Unlock()
			s.resumed.Add(1)
			s.lastBack.Store(now)
		}
		if complete && !st.ready.Load() {
			st.ready.Store(true)
			if s.ready.Add(1) == int64(len(s.streams)) {
				s.readyOnce.Do(func() { close(s.readyCh) })
			}
		}
	}
}

func pct(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(q*float64(len(sorted)-1) + 0.5)
	return sorted[k]
}

func (s *state) wait(version string, t0 int64, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for {
		var lat []float64
		missing := 0
		for _, st := range s.streams {
			st.mu.Lock()
			at, ok := st.seen[version]
			st.mu.Unlock()
			if ok {
				lat = append(lat, float64(at-t0)/1e9)
			} else {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			sort.Float64s(lat)
			ev := map[string]any{
				"event": "converged", "version": version, "received": len(lat),
				"missing": missing, "live": s.live.Load(), "lost": s.lost.Load(),
			}
			if missing > 0 {
				ev["event"] = "timeout"
			}
			if len(lat) > 0 {
				ev["p50_s"] = pct(lat, 0.5)
				ev["p99_s"] = pct(lat, 0.99)
				ev["max_s"] = lat[len(lat)-1]
			}
			s.emit(ev)
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func main() {
	flag.Parse()
	s := &state{out: json.NewEncoder(os.Stdout), codes: map[string]int{}, sample: map[string]string{}, readyCh: make(chan struct{})}
	names := make([]string, *services)
	for i := range names {
		names[i] = "svc-" + strconv.Itoa(i)
	}
	s.names = names
	s.encodedEDS = encodeNames(names)
	s.encodedRoute = encodeNames([]string{"outbound"})
	for i := 0; i < *streams; i++ {
		node := *nodePrefix + strconv.Itoa(*nodeOffset+i)
		if *nodeFormat != "" {
			node = fmt.Sprintf(*nodeFormat, *nodeOffset+i)
		}
		s.streams = append(s.streams, &stream{
			node: node, seen: map[string]int64{}, held: map[string]string{},
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var clients [][]*grpc.ClientConn
	for _, a := range strings.Split(*addr, ",") {
		var per []*grpc.ClientConn
		for i := 0; i < *conns; i++ {
			cc, err := grpc.NewClient(a,
				grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)),
				grpc.WithInitialWindowSize(1<<20), grpc.WithInitialConnWindowSize(16<<20),
			)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			per = append(per, cc)
		}
		clients = append(clients, per)
	}
	s.emit(map[string]any{"event": "hello", "streams": *streams, "conns": *conns})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "start":
			t0 := time.Now()
			for i, st := range s.streams {
				go s.run(ctx, clients, i, st)
			}
			go func() {
				select {
				case <-s.readyCh:
				case <-time.After(*readyTimeout):
				}
				s.emit(map[string]any{
					"event": "ready", "seconds": time.Since(t0).Seconds(),
					"ready": s.ready.Load(), "live": s.live.Load(), "lost": s.lost.Load(),
				})
			}()
		case "wait":
			if len(f) != 4 {
				s.emit(map[string]any{"event": "error", "message": "usage: wait VERSION T0NS SECONDS"})
				continue
			}
			t0, _ := strconv.ParseInt(f[2], 10, 64)
			secs, _ := strconv.ParseFloat(f[3], 64)
			go s.wait(f[1], t0, time.Duration(secs*float64(time.Second)))
		case "stats":
			s.mu.Lock()
			codes := map[string]int{}
			for k, v := range s.codes {
				codes[k] = v
			}
			sample := map[string]string{}
			for k, v := range s.sample {
				sample[k] = v
			}
			s.mu.Unlock()
			s.emit(map[string]any{
				"event": "stats", "live": s.live.Load(), "ready": s.ready.Load(),
				"lost": s.lost.Load(), "reconnects": s.reconns.Load(), "codes": codes,
				"errors": sample, "resumed": s.resumed.Load(), "changed_on_reconnect": s.changed.Load(),
				"unchanged_on_reconnect": s.unchanged.Load(), "first_loss_ns": s.firstLoss.Load(),
				"last_back_ns": s.lastBack.Load(),
			})
		case "quit":
			cancel()
			for _, per := range clients {
				for _, cc := range per {
					_ = cc.Close()
				}
			}
			return
		}
	}
}

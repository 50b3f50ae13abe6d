using System.Buffers.Binary;
using System.Text;
using OffloadRpc;
using OffloadRpc.Interop;
using OffloadRpc.Testing;
using OffloadRpc.Transport;

// The second process of the integration tests and benchmarks. Modes:
//   server <endpoint> [--contract NAME=HASH] [--version N] [--spin-us N] [--no-sleep-slice] [--allow-uid U]
//   client <endpoint> [--version N]                   one echo call; prints OK or REFUSED <type>: <message>
//   client-hold <endpoint> <bytes>                    sends a payload to Hold and waits to be killed
//   client-load <endpoint> <calls> [--callers N]      echo calls, each body unique and checked; prints READY, then OK <calls> or WRONG ...
//   client-mixed <endpoint> <seconds>                 small, 1 MiB, SharedBuffer and pipelined calls for a while, each checked
//   client-idle-stream <endpoint>                     a Stream argument that cannot seek sends 1 KiB and goes quiet; prints CALL <outcome>, then SECOND OK (another call)
//   evil-client <endpoint> <kind>                     breaks the protocol in one way, prints what happened
//   evil-server <endpoint> <kind>                     answers the first request with a broken response
//   evil-raw <endpoint> <kind> <count>                raw sockets: fds-hangup, silent, trickle-hello
//   pingpong-server <file> / (see Benchmarks)         raw spin ping-pong partner
//   probe-server <endpoint> [--traces]                serves ICallProbe with a server interceptor (and span/metric listeners)
//   probe-deadline-only <endpoint> <ms>               WaitForCancelAsync with a deadline the caller never enforces (the server's timer must)
//   hosted-server <endpoint> [--singleton] [--shutdown-ms N]   ICallProbe in a Generic Host (DI per call, interceptor, health)
//   grpc-server <endpoint> [--traces] [--max-message-bytes N] [--no-advertise] [--max-mappings N] [--max-buffered-request-bytes N] [--tls PFX] [--token T]
//                                                     typed services and ICallProbe over shared memory and gRPC (127.0.0.1, port 0); prints READY <socket> <http address>
//   probe-call <endpoint>                             one ICallProbe call; prints OK or FAILED <type>: <message>
return await PeerProgram.RunAsync(args);

internal static class PeerProgram
{
    public static async Task<int> RunAsync(string[] args)
    {
        if (args.Length < 2)
        {
            Console.Error.WriteLine("usage: OffloadRpc.TestPeer <mode> <endpoint> [options]");
            return 2;
        }

        string mode = args[0];
        string endpoint = args[1];
        TransportOptions options = ParseOptions(args, out Dictionary<string, ulong> contracts);
        try
        {
            return mode switch
            {
                "server" => await ServeAsync(endpoint, options, contracts, new PeerHandler()),
                "typed-server" => await TypedServer.RunAsync(endpoint, versioned: args.Contains("--versioned")),
                "probe-server" => await ProbeServer.RunAsync(endpoint, args),
                "probe-call" => await ProbeServer.CallAsync(endpoint, args),
                "probe-deadline-only" => await ProbeServer.DeadlineOnlyAsync(endpoint, options, int.Parse(args[2])),
                "hosted-server" => await HostedProbeServer.RunAsync(endpoint, args),
                "grpc-server" => await GrpcServer.RunAsync(endpoint, args),
                "evil-server" => await ServeAsync(endpoint, options, contracts, new EvilHandler(args[2])),
                "client" => await ClientAsync(endpoint, options, contracts),
                "client-hold" => await ClientHoldAsync(endpoint, options, int.Parse(args[2])),
                "client-idle-stream" => await ClientIdleStreamAsync(endpoint, options),
                "client-mixed" => await ClientMixedAsync(endpoint, options, int.Parse(args[2])),
                "client-load" => await ClientLoadAsync(endpoint, options, int.Parse(args[2]), args.Contains("--callers") ? int.Parse(args[Array.IndexOf(args, "--callers") + 1]) : 1),
                "evil-client" => await EvilClient.RunAsync(endpoint, options, args[2]),
                "evil-raw" => await RawEvil.RunAsync(endpoint, args[2], int.Parse(args[3])),
                _ => Usage(mode),
            };
        }
        catch (Exception ex)
        {
            Console.WriteLine($"ERROR {ex.GetType().FullName}: {ex.Message}");
            return 1;
        }
    }

    private static int Usage(string mode)
    {
        Console.Error.WriteLine($"unknown mode {mode}");
        return 2;
    }

    private static TransportOptions ParseOptions(string[] args, out Dictionary<string, ulong> contracts)
    {
        contracts = new Dictionary<string, ulong>();
        int version = TransportProtocol.Version;
        var allowed = new List<uint>();
        TimeSpan spin = TransportOptions.Default.SpinBudget;
        int slotCount = TransportOptions.Default.SlotCount;
        bool dispatchToThreadPool = false;
        int sleepSlice = SharedWait.DefaultSleepSliceMilliseconds;
        for (int i = 2; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--contract":
                    string[] parts = args[++i].Split('=');
                    contracts[parts[0]] = ulong.Parse(parts[1]);
                    break;
                case "--version":
                    version = int.Parse(args[++i]);
                    break;
                case "--allow-uid":
                    allowed.Add(uint.Parse(args[++i]));
                    break;
                case "--spin-us":
                    spin = TimeSpan.FromMicroseconds(double.Parse(args[++i]));
                    break;
                case "--slots":
                    slotCount = int.Parse(args[++i]);
                    break;
                case "--thread-pool-dispatch":
                    dispatchToThreadPool = true;
                    break;
                case "--no-sleep-slice":
                    sleepSlice = -1;
                    break;
            }
        }

        return new TransportOptions { ProtocolVersion = version, AllowedUserIds = allowed, SpinBudget = spin, SlotCount = slotCount, DispatchToThreadPool = dispatchToThreadPool, SleepSliceMilliseconds = sleepSlice };
    }

    private static async Task<int> ServeAsync(string endpoint, TransportOptions options, Dictionary<string, ulong> contracts, IRequestHandler handler)
    {
        await using var listener = new RpcListener(endpoint, options, contracts.Select(c => new ContractDescriptor(c.Key, c.Value)).ToArray(), _ => handler);
        PeerHandler.Listener = listener;
        listener.ConnectionFailed += ex => Console.WriteLine($"FAILED {ex.GetType().FullName}: {ex.Message}");
        listener.Start();
        Console.WriteLine($"READY {listener.SocketPath}");
        // Serve until the test closes our standard input (or kills us).
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }

    private static async Task<int> ClientIdleStreamAsync(string endpoint, TransportOptions options)
    {
        await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);
        using var stop = new CancellationTokenSource();
        var source = new StreamSource(new QuietStream(1024), -1, stop.Token);
        try
        {
            using RpcReply reply = await connection.CallAsync(PeerMethods.Echo, "idle"u8, [OutboundPayload.FromStream(source, CachePolicy.Auto)]);
            Console.WriteLine("CALL OK");
        }
        catch (Exception ex)
        {
            Console.WriteLine($"CALL {ex.GetType().Name} {(ex as RemoteInvocationException)?.RemoteExceptionType}: {ex.Message}");
        }

        stop.Cancel(); // the quiet source's pending read
        await source.Completion.ContinueWith(_ => { }, TaskScheduler.Default);
        using RpcReply second = await connection.CallAsync(PeerMethods.Echo, "again"u8, default);
        Console.WriteLine(second.Body.SequenceEqual("again"u8) ? "SECOND OK" : "SECOND WRONG");
        return 0;
    }

    private static async Task<int> ClientAsync(string endpoint, TransportOptions options, Dictionary<string, ulong> contracts)
    {
        try
        {
            await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, contracts.Select(c => new ContractDescriptor(c.Key, c.Value)).ToArray(), null, CancellationToken.None);
            byte[] body = Encoding.UTF8.GetBytes("hello");
            using RpcReply reply = await connection.CallAsync(PeerMethods.Echo, body, default);
            Console.WriteLine(reply.Body.SequenceEqual(body) ? "OK" : "WRONG");
            return 0;
        }
        catch (Exception ex) when (ex is OffloadRpcException or UnauthorizedAccessException)
        {
            Console.WriteLine($"REFUSED {ex.GetType().FullName}: {ex.Message}");
            return 0;
        }
    }

    /// <summary>
    /// <paramref name="calls"/> echo calls over one connection from <paramref name="callers"/> concurrent
    /// callers; every body carries this process, the caller and the call's number, and every reply must
    /// be exactly its own call's body (a lost, duplicated or crossed reply shows).
    /// </summary>
    private static async Task<int> ClientLoadAsync(string endpoint, TransportOptions options, int calls, int callers)
    {
        await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);
        Console.WriteLine("READY");
        int pid = Environment.ProcessId;
        long wrong = 0;
        string? first = null;
        await Task.WhenAll(Enumerable.Range(0, callers).Select(caller => Task.Run(async () =>
        {
            byte[] body = new byte[24];
            for (int i = caller; i < calls; i += callers)
            {
                BinaryPrimitives.WriteInt32LittleEndian(body, pid);
                BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(4), caller);
                BinaryPrimitives.WriteInt64LittleEndian(body.AsSpan(8), i);
                BinaryPrimitives.WriteInt64LittleEndian(body.AsSpan(16), (long)pid * 1_000_003 ^ i);
                using RpcReply reply = await connection.CallAsync(PeerMethods.Echo, body, default);
                if (!reply.Body.SequenceEqual(body))
                {
                    Interlocked.Increment(ref wrong);
                    Interlocked.CompareExchange(ref first, $"call {i} of caller {caller} got {Convert.ToHexString(reply.Body)}", null);
                }
            }
        })));
        Console.WriteLine(wrong == 0 ? $"OK {calls}" : $"WRONG {wrong}: {first}");
        return wrong == 0 ? 0 : 1;
    }

    /// <summary>
    /// Calls of every kind for <paramref name="seconds"/>: small echoes, 1 MiB copies, leases passed without a
    /// copy, 4 MiB pipelined payloads; the server answers each payload's checksum, which must be ours.
    /// </summary>
    private static async Task<int> ClientMixedAsync(string endpoint, TransportOptions options, int seconds)
    {
        await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);
        Console.WriteLine("READY");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        byte[] mib = new byte[1 << 20];
        byte[] pipelined = new byte[4 << 20];
        long calls = 0;
        for (ulong seed = (ulong)Environment.ProcessId << 20; clock.Elapsed < TimeSpan.FromSeconds(seconds); seed++)
        {
            switch (calls++ % 4)
            {
                case 0:
                {
                    byte[] body = BitConverter.GetBytes(seed);
                    using RpcReply reply = await connection.CallAsync(PeerMethods.Echo, body, default);
                    Expect(reply.Body.SequenceEqual(body), "echo");
                    break;
                }

                case 1:
                    Checksum64.Fill(mib, seed);
                    await ExpectChecksumAsync(connection, OutboundPayload.Copy(mib), mib.Length, Checksum64.Compute(mib));
                    break;
                case 2:
                {
                    SharedBuffer lease = connection.Rent(256 << 10);
                    Checksum64.Fill(lease.Span, seed);
                    ulong expected = Checksum64.Compute(lease.Span);
                    await ExpectChecksumAsync(connection, OutboundPayload.Move(lease), 256 << 10, expected);
                    break;
                }

                default:
                    Checksum64.Fill(pipelined, seed);
                    await ExpectChecksumAsync(connection, OutboundPayload.Copy(pipelined, TransferMode.Pipelined, CachePolicy.Auto), pipelined.Length, Checksum64.Compute(pipelined));
                    break;
            }
        }

        Console.WriteLine($"OK {calls}");
        return 0;

        static async Task ExpectChecksumAsync(RpcConnection connection, OutboundPayload payload, int length, ulong expected)
        {
            using RpcReply reply = await connection.CallAsync(PeerMethods.Checksum, default, [payload]);
            Expect(BinaryPrimitives.ReadInt64LittleEndian(reply.Body[8..]) == length && BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]) == expected, "checksum");
        }

        static void Expect(bool condition, string what)
        {
            if (!condition)
            {
                Console.WriteLine($"WRONG {what}");
                Environment.Exit(1);
            }
        }
    }

    private static async Task<int> ClientHoldAsync(string endpoint, TransportOptions options, int bytes)
    {
        RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);
        byte[] payload = new byte[bytes];
        Checksum64.Fill(payload, 7);
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 600_000);
        ValueTask<RpcReply> pending = connection.CallAsync(PeerMethods.Hold, body, [OutboundPayload.Copy(payload)]);
        Console.WriteLine("HOLDING");
        using RpcReply reply = await pending; // never returns: the test kills this process
        return 0;
    }
}

/// <summary>The well-behaved server the tests talk to.</summary>
internal sealed class PeerHandler : IRequestHandler
{
    public static RpcListener? Listener { get; set; }

    private static int s_cancellations;

    public ValueTask HandleAsync(IncomingCall call)
    {
        switch (call.MethodId)
        {
            case PeerMethods.Echo:
                return Echo(call);
            case PeerMethods.Checksum:
                return Checksum(call);
            case PeerMethods.Stats:
                Span<byte> stats = stackalloc byte[28];
                BinaryPrimitives.WriteInt64LittleEndian(stats, SharedMemorySegment.MappedBytes);
                BinaryPrimitives.WriteInt64LittleEndian(stats[8..], SharedMemorySegment.LiveSegments);
                BinaryPrimitives.WriteInt32LittleEndian(stats[16..], Listener?.Connections.Count ?? 0);
                BinaryPrimitives.WriteInt32LittleEndian(stats[20..], Volatile.Read(ref s_cancellations));
                BinaryPrimitives.WriteInt32LittleEndian(stats[24..], Environment.ProcessId);
                call.Reply(stats);
                return ValueTask.CompletedTask;
            case PeerMethods.Sleep:
            case PeerMethods.Hold:
                return SleepAsync(call, BinaryPrimitives.ReadInt32LittleEndian(call.Body));
            case PeerMethods.Throw:
                throw new InvalidOperationException("boom: " + Encoding.UTF8.GetString(call.Body));
            case PeerMethods.ReturnLease:
                call.Reply(default, [OutboundPayload.Move(call.TakePayload(0))]);
                return ValueTask.CompletedTask;
            case PeerMethods.RentAndReturn:
                int length = BinaryPrimitives.ReadInt32LittleEndian(call.Body);
                SharedBuffer lease = call.Connection.Rent(length);
                Checksum64.Fill(lease.Span, BinaryPrimitives.ReadUInt64LittleEndian(call.Body[4..]));
                call.Reply(default, [OutboundPayload.Move(lease)]);
                return ValueTask.CompletedTask;
            case PeerMethods.Touch:
                long total = 0;
                for (int i = 0; i < call.PayloadCount; i++)
                {
                    using SharedBuffer touched = call.TakePayload(i);
                    Span<byte> span = touched.Span;
                    total += span.Length + (span.Length > 0 ? (span[0] & 0) + (span[^1] & 0) : 0);
                }

                Span<byte> answer = stackalloc byte[8];
                BinaryPrimitives.WriteInt64LittleEndian(answer, total);
                call.Reply(answer);
                return ValueTask.CompletedTask;
            case PeerMethods.BlockSync:
                Thread.Sleep(BinaryPrimitives.ReadInt32LittleEndian(call.Body));
                call.Reply("blocked"u8);
                return ValueTask.CompletedTask;
            case PeerMethods.StreamChecksum:
            {
                using Stream stream = call.OpenPayloadStream(0);
                byte[] all = new byte[stream.Length];
                int read = stream.Read(all, 0, all.Length); // returns once the first chunk has landed
                long firstRead = System.Diagnostics.Stopwatch.GetTimestamp();
                while (read < all.Length)
                {
                    int n = stream.Read(all, read, all.Length - read);
                    if (n == 0)
                    {
                        break;
                    }

                    read += n;
                }

                Span<byte> reply = stackalloc byte[24];
                BinaryPrimitives.WriteUInt64LittleEndian(reply, Checksum64.Compute(all.AsSpan(0, read)));
                BinaryPrimitives.WriteInt64LittleEndian(reply[8..], read);
                BinaryPrimitives.WriteInt64LittleEndian(reply[16..], firstRead);
                call.Reply(reply);
                return ValueTask.CompletedTask;
            }

            case PeerMethods.BadReply:
                call.Reply(default, new OutboundPayload[17]);
                return ValueTask.CompletedTask;
            default:
                throw new NotSupportedException($"method {call.MethodId}");
        }
    }

    private static ValueTask Echo(IncomingCall call)
    {
        int count = call.PayloadCount;
        var leases = new SharedBuffer[count];
        var copies = new OutboundPayload[count];
        for (int i = 0; i < count; i++)
        {
            leases[i] = call.TakePayload(i);
            copies[i] = OutboundPayload.Copy(leases[i].Memory);
        }

        try
        {
            call.Reply(call.Body, copies);
        }
        finally
        {
            foreach (SharedBuffer lease in leases)
            {
                lease.Dispose();
            }
        }

        return ValueTask.CompletedTask;
    }

    private static ValueTask Checksum(IncomingCall call)
    {
        int count = call.PayloadCount;
        Span<byte> answer = stackalloc byte[8 + 16 * count];
        BinaryPrimitives.WriteUInt64LittleEndian(answer, Checksum64.Compute(call.Body));
        for (int i = 0; i < count; i++)
        {
            using SharedBuffer lease = call.TakePayload(i);
            BinaryPrimitives.WriteInt64LittleEndian(answer[(8 + 16 * i)..], lease.Length);
            BinaryPrimitives.WriteUInt64LittleEndian(answer[(16 + 16 * i)..], Checksum64.Compute(lease.Span));
        }

        call.Reply(answer);
        return ValueTask.CompletedTask;
    }

    private static async ValueTask SleepAsync(IncomingCall call, int milliseconds)
    {
        try
        {
            await Task.Delay(milliseconds, call.CancellationToken);
        }
        catch (OperationCanceledException)
        {
            Interlocked.Increment(ref s_cancellations);
            throw;
        }
    }
}

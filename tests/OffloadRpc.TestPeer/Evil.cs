using System.Buffers.Binary;
using OffloadRpc;
using OffloadRpc.Interop;
using OffloadRpc.Transport;

/// <summary>Writes raw, deliberately broken slots and frames, as a malicious or buggy peer would.</summary>
internal static unsafe class RawWriter
{
    public static void WriteMessage(RpcConnection connection, MessageKind kind, ulong callId, int bodyLength, ReadOnlySpan<PayloadRef> refs, bool corruptSequence = false)
    {
        byte* slot = connection.ReserveRawSlot(out long position);
        try
        {
            WriteSlot(connection, slot, position, callId, kind, bodyLength, refs, corruptSequence);
        }
        finally
        {
            connection.ExitOutbound();
        }
    }

    private static void WriteSlot(RpcConnection connection, byte* slot, long position, ulong callId, MessageKind kind, int bodyLength, ReadOnlySpan<PayloadRef> refs, bool corruptSequence)
    {
        var header = (MessageHeader*)slot;
        header->CallId = callId;
        header->Kind = kind;
        header->Flags = MessageFlags.None;
        header->MethodId = 1;
        header->BodyLength = bodyLength;
        header->PayloadCount = (ushort)refs.Length;
        header->Reserved = 0;
        refs.CopyTo(new Span<PayloadRef>(slot + MessageHeader.Size, refs.Length));
        if (corruptSequence)
        {
            Interlocked.Exchange(ref *(long*)slot, position + 12345);
            connection.WakePeerConsumer();
        }
        else
        {
            connection.PublishRawSlot(position);
        }
    }

    public static void PostRelease(RpcConnection connection, ulong handle)
    {
        connection.EnterOutbound();
        try
        {
            ControlRing ring = connection.OutboundArea.Releases;
            byte* slot = ring.TryReserve(out long position);
            *(ulong*)(slot + 8) = handle;
            ring.Publish(position);
        }
        finally
        {
            connection.ExitOutbound();
        }
    }

    /// <summary>Sends one byte of a frame header with this process's own socket attached (SCM_RIGHTS), and nothing more.</summary>
    public static void SendPartialFrameWithOwnSocket(RpcConnection connection)
    {
        int socket = connection.Channel.DescriptorForTests;
        LinuxNative.SendSome(socket, [12], [socket]);
    }

    /// <summary>Hands over a memfd with the given seals (or none) as segment <paramref name="id"/>.</summary>
    public static void SendSegment(RpcConnection connection, int id, long size, long announcedSize, int seals)
    {
        using SafeMemfdHandle fd = LinuxNative.MemfdCreateHandle("evil", LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
        LinuxNative.Ftruncate(fd, size);
        if (seals != 0)
        {
            LinuxNative.Fcntl(fd, LinuxNative.F_ADD_SEALS, seals);
        }

        Span<byte> frame = stackalloc byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(frame, id);
        BinaryPrimitives.WriteInt64LittleEndian(frame[4..], announcedSize);
        connection.Channel.Send(FrameType.AddSegment, frame, fd, TimeSpan.FromSeconds(10));
    }
}

internal static class EvilClient
{
    /// <summary>Raises a pipelined payload's progress by 64 bytes every 100 ms while the connection lives.</summary>
    public static async Task TrickleAsync(RpcConnection connection, nint header)
    {
        while (!connection.IsClosed && Advance(header))
        {
            await Task.Delay(100);
        }

        static unsafe bool Advance(nint address)
        {
            var header = (PipelineHeader*)address;
            if (Volatile.Read(ref header->BytesReady) >= header->Total - 64)
            {
                return false;
            }

            Interlocked.Add(ref header->BytesReady, 64);
            Interlocked.Increment(ref header->ChunksReady);
            return true;
        }
    }

    private static int KitchenSinkMethod(string name)
    {
        System.Runtime.CompilerServices.RuntimeHelpers.RunModuleConstructor(typeof(OffloadRpc.TestContracts.IKitchenSink).Module.ModuleHandle);
        return OffloadRpc.Internal.ServiceRegistry.Find<OffloadRpc.TestContracts.IKitchenSink>()!.Methods.First(m => m.Name == name).Id;
    }

    public static async Task<int> RunAsync(string endpoint, TransportOptions options, string kind)
    {
        RpcConnection connection = await Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);

        // A legitimate call first, so that segment 1 exists and the server has lent nothing (a typed
        // server serves no raw method 1: those kinds warm up with the segment alone).
        if (kind.StartsWith("typed-", StringComparison.Ordinal))
        {
            connection.Rent(4096).Dispose();
        }
        else
        {
            using RpcReply reply = await connection.CallAsync(1, "warm-up"u8, [OutboundPayload.Copy(new byte[4096])]);
        }

        switch (kind)
        {
            case "corrupt-seq":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [], corruptSequence: true);
                break;
            case "corrupt-offset":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = 1, Offset = 1L << 40, Length = 4096 }]);
                break;
            case "overlong-payload":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = 1, Offset = 0, Length = 1L << 36 }]);
                break;
            case "unknown-segment":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = 77, Offset = 0, Length = 64 }]);
                break;
            case "body-length":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 100_000, []);
                break;
            case "payload-count":
                RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, new PayloadRef[17]);
                break;
            case "bad-kind":
                RawWriter.WriteMessage(connection, (MessageKind)99, 1, 0, []);
                break;
            case "stray-response":
                RawWriter.WriteMessage(connection, MessageKind.Response, 5, 0, []);
                break;
            case "bad-release":
                RawWriter.PostRelease(connection, PayloadArena.MakeHandle(1, 0));
                // A message wakes the server's receive thread, which drains releases after it.
                _ = connection.CallAsync(1, "wake"u8, default).AsTask();
                break;
            case "pipelined-overrun":
            {
                // A pipelined payload whose progress claims more bytes than it announced.
                unsafe
                {
                    SharedBuffer lease = connection.Rent(4096);
                    var header = (PipelineHeader*)(lease.Segment.Base + lease.Offset);
                    header->Total = 1024;
                    header->BytesReady = 1 << 30;
                    RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = lease.Segment.Id, Flags = PayloadRef.Pipelined, Offset = lease.Offset, Length = 1024 }]);
                }

                break;
            }

            case "ring-overrun":
            case "ring-end-mismatch":
            case "ring-past-announced":
            case "ring-negative-announced":
            {
                // A streamed (ring) payload whose counters lie: more bytes past what the server took than its
                // 1 KiB ring holds; an end mark that is not where the bytes end; more bytes than the length it
                // announced; a negative announced length.
                unsafe
                {
                    SharedBuffer lease = connection.Rent(4096);
                    var header = (PipelineHeader*)(lease.Segment.Base + lease.Offset);
                    (header->Total, header->BytesReady, header->Announced) = kind switch
                    {
                        "ring-overrun" => (-1L, 8192L, 0L),
                        "ring-end-mismatch" => (8192L, 512L, 0L),
                        "ring-past-announced" => (-1L, 768L, 512L),
                        _ => (-1L, 0L, -7L),
                    };
                    uint announced = kind is "ring-past-announced" or "ring-negative-announced" ? PayloadRef.LengthAnnounced : 0;
                    RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = lease.Segment.Id, Flags = PayloadRef.Pipelined | PayloadRef.Streamed | announced, Offset = lease.Offset, Length = 1024 }]);
                }

                break;
            }

            case "pipelined-stall":
            {
                // A pipelined payload whose sender stays alive but stops writing after the first 4 KiB.
                unsafe
                {
                    SharedBuffer lease = connection.Rent(64 << 10);
                    var header = (PipelineHeader*)(lease.Segment.Base + lease.Offset);
                    header->Total = 32 << 10;
                    header->BytesReady = 4096;
                    RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = lease.Segment.Id, Flags = PayloadRef.Pipelined, Offset = lease.Offset, Length = 32 << 10 }]);
                }

                break;
            }

            case "unsealed-segment":
                RawWriter.SendSegment(connection, 50, 1 << 20, 1 << 20, seals: 0);
                break;
            case "shrinkable-segment":
                RawWriter.SendSegment(connection, 50, 1 << 20, 1 << 20, seals: LinuxNative.F_SEAL_GROW);
                break;
            case "missized-segment":
                RawWriter.SendSegment(connection, 50, 1 << 20, 2 << 20, seals: SharedMemorySegment.RequiredSeals);
                break;
            case "segment-flood":
                // Small sealed segments under fresh ids, far more than the server's budget allows.
                for (int id = 100; id < 400 && !connection.IsClosed; id++)
                {
                    try
                    {
                        RawWriter.SendSegment(connection, id, 4096, 4096, seals: SharedMemorySegment.RequiredSeals);
                    }
                    catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException)
                    {
                        break; // the server hung up
                    }
                }

                break;
            case "segment-bytes":
                // One sparse segment of 1 GiB: costs the sender nothing, would cost the server a GiB of address space.
                RawWriter.SendSegment(connection, 60, 1L << 30, 1L << 30, seals: SharedMemorySegment.RequiredSeals);
                break;
            case "socket-descriptor":
                // Half a frame with this process's own socket attached: holding it would keep us "alive" forever.
                RawWriter.SendPartialFrameWithOwnSocket(connection);
                break;
            case "no-consume":
            {
                // Requests, but the answers are never consumed: the server's answer ring fills up.
                connection.StopReceivingForTests();
                for (ulong i = 0; i < 600 && !connection.IsClosed; i++)
                {
                    try
                    {
                        RawWriter.WriteMessage(connection, MessageKind.Request, i % 200, 0, []);
                    }
                    catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException)
                    {
                        break;
                    }
                }

                break;
            }

            case "pipelined-trickle":
            {
                // A pipelined payload whose sender writes 64 bytes every 100 ms: progress, but never real progress.
                unsafe
                {
                    SharedBuffer lease = connection.Rent(1 << 20);
                    var header = (PipelineHeader*)(lease.Segment.Base + lease.Offset);
                    header->Total = 512 << 10;
                    header->BytesReady = 0;
                    RawWriter.WriteMessage(connection, MessageKind.Request, 1, 0, [new PayloadRef { SegmentId = lease.Segment.Id, Flags = PayloadRef.Pipelined, Offset = lease.Offset, Length = 512 << 10 }]);
                    _ = TrickleAsync(connection, (nint)header);
                }

                break;
            }

            case "bad-metadata-length":
                // A request flagged as carrying metadata whose block length runs past its body.
                _ = connection.CallAsync(1, [0xFF, 0xFF, 0x00, 0x00, 0x90], default, MessageFlags.HasMetadata, CancellationToken.None).AsTask();
                break;

            case "typed-bad-metadata":
            {
                // A metadata block that fits its body but does not decode, on a typed server's real method.
                System.Runtime.CompilerServices.RuntimeHelpers.RunModuleConstructor(typeof(OffloadRpc.TestContracts.ICallProbe).Module.ModuleHandle);
                int method = OffloadRpc.Internal.ServiceRegistry.Find<OffloadRpc.TestContracts.ICallProbe>()!.Methods.First(m => m.Name == "PingAsync").Id;
                _ = connection.CallAsync(method, [0x03, 0x00, 0x00, 0x00, 0xC1, 0xC1, 0xC1, 0x90], default, MessageFlags.HasMetadata, CancellationToken.None).AsTask();
                break;
            }

            case "typed-garbage":
            case "typed-amplify":
            {
                // A request for a real method whose MessagePack body is garbage, or declares an array of two
                // billion strings in five bytes: decoding either must end the connection, allocating nothing big.
                int method = KitchenSinkMethod("WordsAsync");
                byte[] body = kind == "typed-garbage" ? [0x92, 0xC1, 0xC1, 0xC1] : [0x92, 0xDD, 0x7F, 0xFF, 0xFF, 0xFF];
                _ = connection.CallAsync(method, body, default).AsTask();
                break;
            }

            case "typed-stream-flood":
            {
                // A streamed argument whose items ignore the server's credit: SlowDrainAsync takes one item a
                // second, its window is 16, and 100 items come at once. The 17th beyond the credit ends the connection.
                System.Runtime.CompilerServices.RuntimeHelpers.RunModuleConstructor(typeof(OffloadRpc.TestContracts.IFrameSource).Module.ModuleHandle);
                int method = OffloadRpc.Internal.ServiceRegistry.Find<OffloadRpc.TestContracts.IFrameSource>()!.Methods.First(m => m.Name == "SlowDrainAsync").Id;
                const ulong CallId = 3;
                byte[] body = [0x93, 0xA5, (byte)'f', (byte)'l', (byte)'o', (byte)'o', (byte)'d', 0x00, 0xCD, 0x03, 0xE8]; // ["flood", stream 0, 1000 ms]
                connection.Send(MessageKind.Request, CallId, method, body, default, CancellationToken.None);
                await Task.Delay(TimeSpan.FromSeconds(2)); // the server opened the stream and granted its window
                for (int i = 0; i < 100 && !connection.IsClosed; i++)
                {
                    try
                    {
                        connection.Send(MessageKind.StreamItem, CallId, 0, [(byte)i], default, CancellationToken.None);
                    }
                    catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException)
                    {
                        break;
                    }
                }

                break;
            }

            default:
                Console.WriteLine($"unknown kind {kind}");
                return 2;
        }

        Console.WriteLine("SENT");
        Task closed = connection.Completion;
        if (await Task.WhenAny(closed, Task.Delay(TimeSpan.FromSeconds(20))) == closed)
        {
            Console.WriteLine($"CLOSED {connection.TerminalException?.GetType().FullName}");
        }
        else
        {
            Console.WriteLine("STILL-OPEN");
        }

        await connection.DisposeAsync();
        return 0;
    }
}

/// <summary>A server that answers the first request with a broken response.</summary>
internal sealed class EvilHandler : IRequestHandler
{
    private readonly string _kind;

    public EvilHandler(string kind) => _kind = kind;

    public ValueTask HandleAsync(IncomingCall call)
    {
        switch (_kind)
        {
            case "bad-offset-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, [new PayloadRef { SegmentId = 1, Offset = 1L << 40, Length = 64 }]);
                break;
            case "corrupt-seq-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, [], corruptSequence: true);
                break;
            case "wrong-call-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId ^ (1UL << 40), 0, []);
                break;
            case "duplicate-response":
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, []);
                RawWriter.WriteMessage(call.Connection, MessageKind.Response, call.CallId, 0, []);
                break;
            case "malformed-fault":
                RawWriter.WriteMessage(call.Connection, MessageKind.Fault, call.CallId, 3, []);
                break;
            case "ring-overclaim":
                // The request streams a Stream of unknown length through a ring: claim to have taken more
                // of it than was ever written, so the client would write over bytes still unread.
                unsafe
                {
                    PipelineHeader* header = call.PipelineHeaderForTests(0);
                    if (header is null)
                    {
                        throw new InvalidOperationException("ring-overclaim needs a request with a pipelined payload");
                    }

                    Volatile.Write(ref header->BytesConsumed, 1L << 40);
                    Interlocked.Increment(ref header->ConsumedCount);
                    LinuxNative.FutexWake(&header->ConsumedCount, int.MaxValue);
                }

                break;
            default:
                throw new NotSupportedException(_kind);
        }

        // Stop the transport from answering properly afterwards.
        return new ValueTask(Task.Delay(Timeout.Infinite));
    }
}

/// <summary>Peers below the handshake: raw sockets that misbehave before a connection exists.</summary>
internal static class RawEvil
{
    public static async Task<int> RunAsync(string endpoint, string kind, int count)
    {
        string path = EndpointPath.Resolve(endpoint);
        switch (kind)
        {
            case "fds-hangup":
                // One byte of a frame with four descriptors attached, then gone: the server must close them all.
                for (int i = 0; i < count; i++)
                {
                    using var socket = Connect(path);
                    using SafeMemfdHandle fd = LinuxNative.MemfdCreateHandle("evil-fd", LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
                    int raw = (int)fd.DangerousGetHandle();
                    LinuxNative.SendSome((int)socket.SafeHandle.DangerousGetHandle(), [1], [raw, raw, raw, raw]);
                }

                Console.WriteLine("DONE");
                return 0;
            case "silent":
            {
                // Connected, never a word: they may cost the server nothing but a descriptor each, and are dropped at the handshake timeout.
                var sockets = new List<System.Net.Sockets.Socket>();
                for (int i = 0; i < count; i++)
                {
                    sockets.Add(Connect(path));
                }

                Console.WriteLine("HOLDING");
                int closed = 0;
                foreach (System.Net.Sockets.Socket socket in sockets)
                {
                    byte[] one = new byte[64];
                    socket.ReceiveTimeout = 60_000;
                    try
                    {
                        if (socket.Receive(one) == 0)
                        {
                            closed++;
                        }
                    }
                    catch (System.Net.Sockets.SocketException)
                    {
                        closed++;
                    }
                }

                Console.WriteLine($"CLOSED {closed}");
                return 0;
            }

            case "trickle-hello":
            {
                // A Hello that arrives one byte a second: one deadline for the whole handshake ends it.
                using var socket = Connect(path);
                var clock = System.Diagnostics.Stopwatch.StartNew();
                byte[] frame = [200, 0, 0, 0, 1, 0, 0, 0, .. new byte[200]];
                foreach (byte b in frame)
                {
                    try
                    {
                        if (socket.Send([b]) != 1)
                        {
                            break;
                        }

                        await Task.Delay(1000);
                        if (socket.Poll(0, System.Net.Sockets.SelectMode.SelectRead) && socket.Available == 0)
                        {
                            break; // the server hung up
                        }
                    }
                    catch (System.Net.Sockets.SocketException)
                    {
                        break;
                    }
                }

                Console.WriteLine($"CLOSED {clock.Elapsed.TotalSeconds:0}");
                return 0;
            }

            default:
                Console.WriteLine($"unknown kind {kind}");
                return 2;
        }
    }

    private static System.Net.Sockets.Socket Connect(string path)
    {
        var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        socket.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(path));
        return socket;
    }
}

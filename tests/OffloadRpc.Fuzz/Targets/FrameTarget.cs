using System.Net.Sockets;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// Socket frames after the handshake: the bytes (and descriptors) a peer writes on its socket, read by
/// <see cref="SocketChannel.TryReceive"/> over a real socket pair (headers, lengths, partial frames,
/// descriptors that are not memfds, too many descriptors) and each whole frame handled by the
/// connection (<see cref="RpcConnection.HandleFrame"/>: segment hand-over, acknowledgement, removal).
/// Input: a flags byte (bit 0: a sealed 64 KiB memfd rides with the first write; bit 1: a pipe instead;
/// bit 2: two memfds; bit 3: a memfd of the wrong size; bits 4-7: how many writes the bytes are split into),
/// then the raw stream.
/// </summary>
internal sealed unsafe class FrameTarget : FuzzTarget
{
    private const int MaxInput = 96 << 10; // stays within the socket buffer: the peer never blocks

    public override string Name => "frames";

    public override string Description => "socket frames read by SocketChannel and handled by the connection (segments, acknowledgements, removals)";

    public override void Run(ReadOnlySpan<byte> data)
    {
        var input = new FuzzInput(data);
        int flags = input.Byte();
        ReadOnlySpan<byte> stream = input.Rest();
        if (stream.Length > MaxInput)
        {
            stream = stream[..MaxInput];
        }

        using var rig = new ConnectionRig(serve: false);
        (Socket ours, Socket peer) = ConnectionRig.SocketPair();
        using var channel = new SocketChannel(ours);
        using (peer)
        {
            WritePeer(peer, stream, flags);
            peer.Shutdown(SocketShutdown.Send);
            Read(channel, rig);
        }

        Verdict.CheckTerminal(rig.Connection.TerminalException, "HandleFrame");
    }

    private static void Read(SocketChannel channel, ConnectionRig rig)
    {
        for (int frames = 0; frames < 100_000; frames++)
        {
            FrameStatus status;
            try
            {
                status = channel.TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors);
                if (status == FrameStatus.Frame)
                {
                    using (descriptors)
                    {
                        rig.Connection.HandleFrame(type, payload, descriptors);
                    }

                    continue;
                }
            }
            catch (Exception ex)
            {
                Verdict.Check(ex, e => e is ProtocolViolationException, "SocketChannel/HandleFrame");
                return;
            }

            if (status == FrameStatus.WouldBlock)
            {
                throw new FuzzFailure("SocketChannel: WouldBlock on a socket whose peer wrote everything and shut down (a lost end of stream).");
            }

            return; // end of stream
        }

        throw new FuzzFailure("SocketChannel: frames without end.");
    }

    private static void WritePeer(Socket peer, ReadOnlySpan<byte> stream, int flags)
    {
        var attach = new List<SafeHandle>();
        try
        {
            if ((flags & 1) != 0)
            {
                attach.Add(Memfd(ConnectionRig.PeerSegmentSize));
            }

            if ((flags & 2) != 0)
            {
                attach.Add(PipeEnd());
            }

            if ((flags & 4) != 0)
            {
                attach.Add(Memfd(ConnectionRig.PeerSegmentSize));
                attach.Add(Memfd(ConnectionRig.PeerSegmentSize));
            }

            if ((flags & 8) != 0)
            {
                attach.Add(Memfd(4096));
            }

            Span<int> fds = stackalloc int[attach.Count];
            for (int i = 0; i < attach.Count; i++)
            {
                fds[i] = (int)attach[i].DangerousGetHandle();
            }

            int pieces = Math.Max(1, flags >> 4);
            int size = Math.Max(1, (stream.Length + pieces - 1) / pieces);
            int fd = (int)peer.SafeHandle.DangerousGetHandle();
            // At most four descriptors ride with one write; more ride with the second (together they are more than a frame may carry).
            ReadOnlySpan<int> first = fds[..Math.Min(fds.Length, LinuxNative.MaxFdsPerMessage)];
            ReadOnlySpan<int> second = fds[first.Length..];
            int write = 0;
            for (int sent = 0; sent < stream.Length || (write == 0 && !fds.IsEmpty);)
            {
                // A descriptor needs at least one byte to ride on.
                ReadOnlySpan<byte> chunk = stream.IsEmpty ? [0] : stream.Slice(sent, Math.Min(size, stream.Length - sent));
                int n = LinuxNative.SendSome(fd, chunk, write == 0 ? first : write == 1 ? second : default);
                if (n <= 0)
                {
                    throw new InvalidOperationException($"The rig could not write the peer's bytes (errno {-n}).");
                }

                write++;
                sent += n;
            }
        }
        finally
        {
            foreach (SafeHandle handle in attach)
            {
                handle.Dispose();
            }
        }
    }

    private static SafeMemfdHandle Memfd(long size)
    {
        using SharedMemorySegment segment = SharedMemorySegment.Create(0, size, "offloadrpc-fuzz-frame", populate: false);
        return new SafeMemfdHandle(Dup((int)segment.Descriptor.DangerousGetHandle()));
    }

    private static SafeMemfdHandle PipeEnd()
    {
        int* fds = stackalloc int[2];
        if (Pipe(fds) != 0)
        {
            throw new InvalidOperationException("pipe failed");
        }

        Close(fds[1]);
        return new SafeMemfdHandle(fds[0]);
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static extern int Dup(int fd);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "pipe", SetLastError = true)]
    private static extern int Pipe(int* fds);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "close", SetLastError = true)]
    private static extern int Close(int fd);

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        yield return ("add-segment", new InputWriter().Byte(1).Bytes(Frame(FrameType.AddSegment, w => w.Int32(2).Int64(ConnectionRig.PeerSegmentSize))).ToArray());
        yield return ("add-segment-split", new InputWriter().Byte(0x31).Bytes(Frame(FrameType.AddSegment, w => w.Int32(2).Int64(ConnectionRig.PeerSegmentSize))).ToArray());
        yield return ("add-then-remove", new InputWriter().Byte(1)
            .Bytes(Frame(FrameType.AddSegment, w => w.Int32(3).Int64(ConnectionRig.PeerSegmentSize)))
            .Bytes(Frame(FrameType.RemoveSegment, w => w.Int32(3)))
            .Bytes(Frame(FrameType.RemoveSegment, w => w.Int32(ConnectionRig.PeerSegmentId))).ToArray());
        yield return ("acknowledge", new InputWriter().Byte(0).Bytes(Frame(FrameType.SegmentMapped, w => w.Int32(2))).ToArray());
        yield return ("segment-wrong-size", new InputWriter().Byte(8).Bytes(Frame(FrameType.AddSegment, w => w.Int32(2).Int64(ConnectionRig.PeerSegmentSize))).ToArray());
        yield return ("segment-pipe", new InputWriter().Byte(2).Bytes(Frame(FrameType.AddSegment, w => w.Int32(2).Int64(4096))).ToArray());
        yield return ("segment-id-taken", new InputWriter().Byte(1).Bytes(Frame(FrameType.AddSegment, w => w.Int32(ConnectionRig.PeerSegmentId).Int64(ConnectionRig.PeerSegmentSize))).ToArray());
        yield return ("two-descriptors", new InputWriter().Byte(4).Bytes(Frame(FrameType.AddSegment, w => w.Int32(2).Int64(ConnectionRig.PeerSegmentSize))).ToArray());
        yield return ("hello-after-handshake", new InputWriter().Byte(0).Bytes(Frame(FrameType.Hello, w => w.Int32(0))).ToArray());
        yield return ("oversized-length", new InputWriter().Byte(0).Int32(1 << 20).UInt16((int)FrameType.SegmentMapped).UInt16(0).ToArray());
        yield return ("partial-header", new InputWriter().Byte(1).Bytes([12, 0, 0]).ToArray());
        yield return ("partial-payload", new InputWriter().Byte(0x21).Int32(12).UInt16((int)FrameType.AddSegment).UInt16(0).Int32(2).ToArray());
    }

    private static byte[] Frame(FrameType type, Action<InputWriter> payload)
    {
        var body = new InputWriter();
        payload(body);
        byte[] bytes = body.ToArray();
        return new InputWriter().Int32(bytes.Length).UInt16((int)type).UInt16(0).Bytes(bytes).ToArray();
    }
}

using System.Text;
using OffloadRpc.Internal;
using OffloadRpc.Interop;
using OffloadRpc.TestContracts;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// The handshake: the server's reading of a client's Hello (<see cref="Handshake.Admit"/>: version,
/// ring geometry, contracts, the attached control area, then Welcome or Reject sent back), and the
/// client's reading of the server's Welcome or Reject (<see cref="Handshake.ReadWelcome"/>).
/// Input: a mode byte (bits 0-1: 0 Hello, 1 Welcome, 2 Reject, 3 the frame type in the next byte;
/// bit 2: no descriptor; bit 3: two descriptors), then the frame's payload.
/// </summary>
internal sealed class HandshakeTarget : FuzzTarget
{
    private static readonly ContractDescriptor[] s_served =
    [
        new(ServiceRegistry.Find<IFuzzContract>()!.Name, ServiceRegistry.Find<IFuzzContract>()!.ContractHash),
        new(ServiceRegistry.Find<IKitchenSink>()!.Name, ServiceRegistry.Find<IKitchenSink>()!.ContractHash),
    ];

    public override string Name => "handshake";

    public override string Description => "Hello parsed by the server (Admit), Welcome and Reject parsed by the client";

    public override void Run(ReadOnlySpan<byte> data)
    {
        var input = new FuzzInput(data);
        int mode = input.Byte();
        FrameType type = (mode & 3) switch
        {
            0 => FrameType.Hello,
            1 => FrameType.Welcome,
            2 => FrameType.Reject,
            _ => (FrameType)input.Byte(),
        };
        byte[] payload = input.Rest().ToArray();
        int descriptors = (mode & 4) != 0 ? 0 : (mode & 8) != 0 ? 2 : 1;
        if ((mode & 3) == 0)
        {
            Serve(type, payload, descriptors);
        }
        else
        {
            Read(type, payload, descriptors);
        }
    }

    /// <summary>The server's half: Admit the Hello, with a control area of the geometry it declares (when that is sane) attached.</summary>
    private static void Serve(FrameType type, byte[] payload, int descriptors)
    {
        (System.Net.Sockets.Socket ours, System.Net.Sockets.Socket peer) = ConnectionRig.SocketPair();
        using var peerSocket = peer;
        var channel = new SocketChannel(ours);
        var handles = new SafeMemfdHandle?[descriptors];
        for (int i = 0; i < descriptors; i++)
        {
            handles[i] = ClientArea(payload);
        }

        using var hello = new FrameHolder { Type = type, Payload = payload, Descriptors = new ReceivedDescriptors(handles, descriptors) };
        try
        {
            var info = new PeerInfo(Environment.ProcessId, LinuxNative.GetEuid(), 0);
            RpcConnection connection = Handshake.Admit(channel, hello, info, ConnectionRig.Options, s_served, new ServiceDispatcher(ConnectionRig.Serializer));
            connection.Terminate(new ObjectDisposedException("fuzz"));
            connection.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
        catch (Exception ex)
        {
            Verdict.Check(ex, e => e is ProtocolViolationException or ContractMismatchException, "Admit");
            channel.Dispose();
        }
    }

    /// <summary>A client's control area: of the geometry the Hello declares when that is valid and small, else of the default one.</summary>
    private static unsafe SafeMemfdHandle ClientArea(byte[] payload)
    {
        RingGeometry geometry = ConnectionRig.Options.Geometry;
        if (payload.Length >= 20)
        {
            var declared = new RingGeometry(BitConverter.ToInt32(payload, 8), BitConverter.ToInt32(payload, 12), BitConverter.ToInt32(payload, 16));
            if (declared.Validate() is null && ControlArea.RequiredSize(declared) <= 1 << 20)
            {
                geometry = declared;
            }
        }

        using ControlArea area = ControlArea.Create(geometry, "offloadrpc-fuzz-hello");
        int fd = Dup((int)area.Segment.Descriptor.DangerousGetHandle());
        return new SafeMemfdHandle(fd);
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static extern int Dup(int fd);

    /// <summary>The client's half: the answer to its Hello.</summary>
    private static void Read(FrameType type, byte[] payload, int descriptors)
    {
        var handles = new SafeMemfdHandle?[descriptors];
        for (int i = 0; i < descriptors; i++)
        {
            handles[i] = new SafeMemfdHandle(Dup(0)); // any descriptor: ReadWelcome only counts them
        }

        using var frame = new FrameHolder { Type = type, Payload = payload, Descriptors = new ReceivedDescriptors(handles, descriptors) };
        try
        {
            Handshake.ReadWelcome(frame, "fuzz", ConnectionRig.Options);
        }
        catch (Exception ex)
        {
            Verdict.Check(ex, e => e is ProtocolViolationException or ContractMismatchException or UnauthorizedAccessException, "ReadWelcome");
        }
    }

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        yield return ("hello", new InputWriter().Byte(0).Bytes(Contracts(withGeometry: true, s_served)).ToArray());
        yield return ("hello-no-contracts", new InputWriter().Byte(0).Bytes(Contracts(withGeometry: true, [])).ToArray());
        yield return ("hello-other-client-contract", new InputWriter().Byte(0).Bytes(Contracts(withGeometry: true, [new("Some.Other.IService", 42)])).ToArray());
        yield return ("hello-mismatch", new InputWriter().Byte(0).Bytes(Contracts(withGeometry: true, [new(s_served[0].Name, s_served[0].Hash ^ 1)])).ToArray());
        yield return ("hello-no-descriptor", new InputWriter().Byte(4).Bytes(Contracts(withGeometry: true, s_served)).ToArray());
        yield return ("hello-bad-geometry", new InputWriter().Byte(0).Int32((int)TransportProtocol.HelloMagic).Int32(TransportProtocol.Version).Int32(448).Int32(3).Int32(8).UInt16(0).ToArray());
        yield return ("hello-big-rings", new InputWriter().Byte(0).Int32((int)TransportProtocol.HelloMagic).Int32(TransportProtocol.Version).Int32(64 << 10).Int32(1 << 16).Int32(8).UInt16(0).ToArray());
        yield return ("welcome", new InputWriter().Byte(1).Bytes(Contracts(withGeometry: false, s_served)).ToArray());
        yield return ("welcome-truncated", new InputWriter().Byte(1).Int32((int)TransportProtocol.HelloMagic).Int32(TransportProtocol.Version).UInt16(3).UInt16(700).ToArray());
        yield return ("reject-version", Reject(1, "version 2 here", string.Empty));
        yield return ("reject-contract", Reject(2, "contract mismatch", s_served[0].Name));
        yield return ("reject-unauthorized", Reject(4, "uid 1000", string.Empty));
        yield return ("other-frame", new InputWriter().Byte(3).Byte((int)FrameType.AddSegment).Int32(1).Int64(4096).ToArray());
    }

    private static byte[] Reject(int reason, string message, string service)
    {
        byte[] text = Encoding.UTF8.GetBytes(message);
        byte[] name = Encoding.UTF8.GetBytes(service);
        return new InputWriter().Byte(2).UInt16(reason).UInt16(text.Length).Bytes(text).UInt16(name.Length).Bytes(name).ToArray();
    }

    /// <summary>Hello: magic, version, geometry, contracts. Welcome: magic, version, contracts.</summary>
    private static byte[] Contracts(bool withGeometry, IReadOnlyList<ContractDescriptor> contracts)
    {
        var writer = new InputWriter().Int32((int)TransportProtocol.HelloMagic).Int32(TransportProtocol.Version);
        if (withGeometry)
        {
            writer.Int32(ConnectionRig.Options.SlotSize).Int32(ConnectionRig.Options.SlotCount).Int32(ConnectionRig.Options.ReleaseSlotCount);
        }

        writer.UInt16(contracts.Count);
        foreach (ContractDescriptor contract in contracts)
        {
            byte[] name = Encoding.UTF8.GetBytes(contract.Name);
            writer.UInt16(name.Length).Bytes(name).Int64((long)contract.Hash);
        }

        return writer.ToArray();
    }
}

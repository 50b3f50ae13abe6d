using System.Reflection;
using MessagePack;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz.Targets;

/// <summary>
/// The client's decoding of answers: a call made through a generated proxy is answered with a fuzzed
/// Response (the generated result decoder: MessagePack, payload indexes, leases) or Fault
/// (<see cref="FaultCodec"/>). Input: a method selector byte, a flags byte (bit 0: the body goes in the
/// arena; bits 1-3: payload count; bit 4: a Fault), a u16 length per payload, then the body.
/// </summary>
internal sealed class ReplyTarget : FuzzTarget
{
    public override string Name => "reply";

    public override string Description => "generated proxies decoding results, and faults decoded by the client";

    public override void Run(ReadOnlySpan<byte> data)
    {
        var input = new FuzzInput(data);
        MethodDescriptor method = ConnectionRig.Methods[input.Byte() % ConnectionRig.Methods.Count];
        bool fault = input.Remaining > 0 && (data[1] & 16) != 0;
        using var rig = new ConnectionRig(serve: false);
        int sent = rig.RequestIds.Count;
        Task<object?> call = ProxyCalls.Start(rig.Connection, method);
        rig.DrainOutbound();
        for (int i = 0; i < 2000 && rig.RequestIds.Count == sent && !call.IsCompleted; i++)
        {
            Thread.Sleep(1); // a stream or async-enumerable argument is gathered first, on the thread pool
            rig.DrainOutbound();
        }

        if (rig.RequestIds.Count == sent)
        {
            throw new FuzzFailure($"{method.Name}: the proxy sent no request ({(call.IsFaulted ? Verdict.Describe(call.Exception!.InnerException!) : "no failure")}).");
        }

        long before = GC.GetTotalAllocatedBytes(precise: true);
        int bodyLength = PlacedMessage.Write(rig, ref input, fault ? MessageKind.Fault : MessageKind.Response, rig.RequestIds[^1], method.Id);
        rig.Poll();
        if (!((IAsyncResult)call).AsyncWaitHandle.WaitOne(TimeSpan.FromSeconds(5)))
        {
            throw new FuzzFailure($"{method.Name}: the call did not complete after its answer arrived (a hang).");
        }

        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        if (call.IsCompletedSuccessfully)
        {
            (call.Result as IDisposable)?.Dispose(); // a SharedBuffer result goes back
        }
        else
        {
            Exception failure = call.Exception!.InnerException!;
            Verdict.Check(failure, e => e is RemoteInvocationException or PeerDisconnectedException or ObjectDisposedException
                || (e is ProtocolViolationException && (e.InnerException is null || Verdict.IsDecodeError(e.InnerException))), method.Name);
        }

        Verdict.CheckTerminal(rig.Connection.TerminalException, method.Name);
        PlacedMessage.CheckAllocation(allocated, bodyLength, method.Name);
    }

    public override IEnumerable<(string Name, byte[] Data)> Seeds()
    {
        for (int i = 0; i < ConnectionRig.Methods.Count; i++)
        {
            MethodDescriptor method = ConnectionRig.Methods[i];
            MethodInfo info = ProxyCalls.Find(method);
            Type? result = ProxyCalls.ResultType(info);
            if (result is null)
            {
                yield return (method.Name, PlacedMessage.Input(i, false, [], []));
            }
            else if (ProxyCalls.IsBuffer(result))
            {
                yield return (method.Name, PlacedMessage.Input(i, false, [64], [0x00]));
                yield return (method.Name + "-null", PlacedMessage.Input(i, false, [], [0xFF]));
            }
            else
            {
                object? value = result == typeof(string) ? "r"
                    : result.IsArray ? Array.CreateInstance(result.GetElementType()!, 2)
                    : result.IsValueType || result.GetConstructor(Type.EmptyTypes) is not null ? Activator.CreateInstance(result)
                    : null;

                yield return (method.Name, PlacedMessage.Input(i, false, [], MessagePackSerializer.Serialize(result, value, ConnectionRig.Serializer.Options)));
            }
        }

        int make = ConnectionRig.Methods.ToList().FindIndex(m => m.Name == nameof(IFuzzContract.MakeSamplesAsync));
        yield return ("samples-declared-huge", PlacedMessage.Input(make, false, [], [0xDD, 0x7F, 0xFF, 0xFF, 0xFF]));
        yield return ("samples-in-arena", PlacedMessage.Input(make, true, [], MessagePackSerializer.Serialize(new Sample[40], ConnectionRig.Serializer.Options)));
        yield return ("fault", PlacedMessage.Input(0, false, [], new InputWriter().Int32(4).Bytes("Boom"u8).Int32(2).Bytes("no"u8).Int32(5).Bytes("stack"u8).ToArray()) is var f ? Fault(f) : []);
        yield return ("fault-truncated", Fault(PlacedMessage.Input(1, false, [], new InputWriter().Int32(400).Bytes("Boom"u8).ToArray())));
        yield return ("fault-in-arena", Fault(PlacedMessage.Input(2, true, [], new InputWriter().Int32(4).Bytes("Boom"u8).Int32(0).Int32(0).ToArray())));
    }

    private static byte[] Fault(byte[] input)
    {
        input[1] |= 16;
        return input;
    }
}

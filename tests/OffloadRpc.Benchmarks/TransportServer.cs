using System.Buffers.Binary;
using OffloadRpc.Testing;
using OffloadRpc.Transport;

namespace OffloadRpc.Benchmarks;

/// <summary>The server process of the benchmark: touch (move only), checksum (read every byte), echo.</summary>
internal sealed class TransportServer : IRequestHandler
{
    public static async Task<int> RunAsync(string endpoint)
    {
        await using var listener = new RpcListener(endpoint, new TransportOptions(), [], _ => new TransportServer());
        listener.Start();
        Console.WriteLine("READY");
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }

    public ValueTask HandleAsync(IncomingCall call)
    {
        Span<byte> answer = stackalloc byte[8];
        switch (call.MethodId)
        {
            case PeerMethods.Touch:
                long total = 0;
                for (int i = 0; i < call.PayloadCount; i++)
                {
                    using SharedBuffer lease = call.TakePayload(i);
                    Span<byte> span = lease.Span;
                    total += span.Length == 0 ? 0 : span.Length + (span[0] & 0) + (span[^1] & 0);
                }

                BinaryPrimitives.WriteInt64LittleEndian(answer, total);
                call.Reply(answer);
                break;
            case PeerMethods.Checksum:
                using (SharedBuffer lease = call.TakePayload(0))
                {
                    BinaryPrimitives.WriteUInt64LittleEndian(answer, Checksum64.Compute(lease.Span));
                }

                call.Reply(answer);
                break;
            default:
                call.Reply(call.Body);
                break;
        }

        return ValueTask.CompletedTask;
    }
}

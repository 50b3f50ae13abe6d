using OffloadRpc.CodeFixes;
using Xunit;
using Verify = OffloadRpc.Analyzers.Tests.AnalyzerVerifier<OffloadRpc.Analyzers.BufferInFlightAnalyzer>;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>OFFRPC2005: a buffer written while an Offload/Pipelined call may still read it.</summary>
public sealed class BufferInFlightTests
{
    private const string Service = """
        using System;
        using System.Threading.Tasks;
        using OffloadRpc;

        [OffloadService]
        public interface IService
        {
            Task SendAsync([Transfer(TransferMode.Offload)] byte[] data);
            Task CopyAsync([Transfer(TransferMode.Copy)] byte[] data);
        }

        """;

    [Fact]
    public Task Writes_before_the_await_are_reported_and_safe_ones_are_not() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(IService service, byte[] source)
            {
                byte[] data = new byte[1 << 20];
                Task pending = service.SendAsync(data);
                {|OFFRPC2005:data[0] = 1|};
                {|OFFRPC2005:Array.Fill(data, (byte)2)|};
                {|OFFRPC2005:source.CopyTo(data, 0)|};
                await pending;
                data[0] = 3;                                   // after the await: fine

                await service.SendAsync(data);                 // awaited at once
                data[1] = 4;

                Task copied = service.CopyAsync(data);         // Copy mode: the bytes are in shared memory on return
                data[2] = 5;
                await copied;
            }
        }
        """);

    [Fact]
    public Task The_fix_passes_a_copy() => Verify.VerifyFixAsync<BufferInFlightFix>(
        Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                byte[] data = new byte[1 << 20];
                Task pending = service.SendAsync(data);
                {|OFFRPC2005:data[0] = 1|};
                await pending;
            }
        }
        """,
        Service + """
        public static class Caller
        {
            public static async Task Run(IService service)
            {
                byte[] data = new byte[1 << 20];
                Task pending = service.SendAsync((byte[])data.Clone());
                data[0] = 1;
                await pending;
            }
        }
        """);
}

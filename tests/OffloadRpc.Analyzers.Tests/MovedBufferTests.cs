using OffloadRpc.CodeFixes;
using Xunit;
using Verify = OffloadRpc.Analyzers.Tests.AnalyzerVerifier<OffloadRpc.Analyzers.MovedBufferAnalyzer>;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>OFFRPC2006: a SharedBuffer used or disposed after a call took it.</summary>
public sealed class MovedBufferTests
{
    private const string Service = """
        using System;
        using System.Threading.Tasks;
        using OffloadRpc;

        [OffloadService]
        public interface IService
        {
            Task ProcessAsync(SharedBuffer frame);
        }

        """;

    [Fact]
    public Task Uses_after_the_move_are_reported_and_uses_before_or_of_a_new_buffer_are_not() => Verify.VerifyAsync(Service + """
        public static class Caller
        {
            public static async Task Run(OffloadRpcConnection connection, IService service)
            {
                SharedBuffer frame = connection.Rent(1024);
                frame.Span[0] = 1;                          // before the move: fine
                await service.ProcessAsync(frame);
                {|OFFRPC2006:frame|}.Span[1] = 2;
                frame = connection.Rent(16);                // a new lease
                frame.Span[0] = 3;
                await service.ProcessAsync(frame);

                using SharedBuffer kept = connection.Rent(64); // the using's dispose after a move does nothing
                await service.ProcessAsync(kept);
            }
        }
        """);

    [Fact]
    public Task The_fix_removes_a_dispose_of_a_moved_lease() => Verify.VerifyFixAsync<MovedBufferDisposeFix>(
        Service + """
        public static class Caller
        {
            public static async Task Run(OffloadRpcConnection connection, IService service)
            {
                SharedBuffer frame = connection.Rent(1024);
                await service.ProcessAsync(frame);
                {|OFFRPC2006:frame|}.Dispose();
            }
        }
        """,
        Service + """
        public static class Caller
        {
            public static async Task Run(OffloadRpcConnection connection, IService service)
            {
                SharedBuffer frame = connection.Rent(1024);
                await service.ProcessAsync(frame);
            }
        }
        """);
}
